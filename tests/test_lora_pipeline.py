"""From a fresh clone to lm-eval results, one documented command per step (README, "LoRA, export and
evaluation"): fit the LoRA demo for a few steps, export it merged and as an adapter, load both with
transformers and PEFT, write the local SIB-200 tasks and score both with lm-eval's own CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from peft import PeftModel
from test_lm_eval import sib200  # noqa: F401  (fixture: ../shared's SIB-200, or made-up rows without it)
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHECKPOINT = "runs/demo_lora/tensorboard/version_0/checkpoints/last.ckpt"
LANGUAGES = ["eng_Latn", "rus_Cyrl"]


def run(*command: str, cwd: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def lm_eval(model_args: str, tasks: Path, out: Path, cwd: Path) -> dict[str, float]:
    run(str(BIN / "lm_eval"), "--model", "hf", "--model_args", model_args, "--device", "cpu", "--batch_size", "8",
        "--include_path", str(tasks), "--tasks", "sib200_local", "--output_path", str(out), cwd=cwd)
    (results,) = out.rglob("results_*.json")
    return {task: values["acc,none"] for task, values in json.loads(results.read_text())["results"].items()}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fit_export_load_and_score_with_lm_eval(tmp_path, sib200):  # noqa: F811
    config = str(REPO / "configs" / "demo_lora.yaml")
    run(str(BIN / "lightning-moo"), "fit", "--config", config, "--trainer.max_steps=4", "--trainer.devices=2",
        "--data.train_languages=[deu,rus]", cwd=tmp_path)
    for out, flags in (("runs/demo_lora/hf", ["--adapter"]), ("runs/demo_lora/hf_merged", [])):
        run(str(BIN / "lightning-moo"), "export", "--config", config, "--ckpt_path", CHECKPOINT, "--out", out, *flags, cwd=tmp_path)
    adapter, merged = tmp_path / "runs/demo_lora/hf", tmp_path / "runs/demo_lora/hf_merged"

    # transformers loads the merged model, PEFT the adapter on the base export wrote beside it; the
    # adapter trained (it changes the base's logits) and merging it changed nothing else.
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(base).eval()(ids).logits
        adapted_logits = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()(ids).logits
    torch.testing.assert_close(adapted_logits, merged_logits, rtol=1e-5, atol=1e-5)
    assert (adapted_logits - base_logits).abs().max() > 1e-3

    tasks = tmp_path / "runs/demo_lora/lm_eval_tasks"
    printed = run(str(BIN / "lightning-moo"), "lm-eval-tasks", "--sib200", str(sib200), "--languages", *LANGUAGES,
                  "--tokenizer", str(merged), "--out", str(tasks), "--max-examples", "8", cwd=tmp_path)
    assert "add_bos_token=False" in printed
    from_merged = lm_eval(f"pretrained={merged},add_bos_token=False,dtype=float32", tasks, tmp_path / "eval_merged", tmp_path)
    from_adapter = lm_eval(f"pretrained={base},peft={adapter},tokenizer={adapter},add_bos_token=False,dtype=float32",
                           tasks, tmp_path / "eval_adapter", tmp_path)
    assert set(from_merged) >= {f"sib200_local_{language}" for language in LANGUAGES}
    assert all(0 <= acc <= 1 for acc in from_merged.values())
    assert from_adapter == pytest.approx(from_merged, abs=1e-9)
