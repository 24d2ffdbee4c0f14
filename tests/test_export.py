"""``lightning-moo export``: checkpoints of short 2-rank DeepSpeed runs (LoRA and full fine-tuning) as
Hugging Face directories, checked against the trained module's own logits and DeepSpeed's own
``zero_to_fp32.py``; single-file (DDP) checkpoints; and what it refuses."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lightning_moo.cli import main
from lightning_moo.module import MultilingualLM

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DISTRIBUTED = HERE / "distributed"  # cli_callbacks.SaveParams, named by the configs; test_cli's launcher
sys.path.insert(0, str(DISTRIBUTED))
from test_cli import launch  # noqa: E402
STEPS = 4
MODEL = {"model_config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "num_key_value_heads": 1},
         "lr": 1e-2, "warmup_steps": 0}
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]}
TEXTS = ["Das Wetter ist heute schön.", "Поезд опаздывает."]


def config(out: Path, run: str, peft: dict | None) -> Path:
    """A 2-rank ZeRO-2 fit of STEPS steps on two languages, no validation; it saves step=4.ckpt and
    the final parameters of the Hugging Face model (SaveParams) to <run>.pt."""
    model = {**MODEL, "peft": peft} if peft is not None else MODEL
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 2, "max_steps": STEPS, "limit_val_batches": 0, "logger": False,
            "default_root_dir": str(out),  # where fit saves its config.yaml (there is no logger)
            "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(out / "checkpoints"), "filename": "{step}", "every_n_train_steps": STEPS}},
                {"class_path": "cli_callbacks.SaveParams", "init_args": {"path": str(out / f"{run}.pt")}},
            ],
        },
        "strategy": {"class_path": "lightning_moo.strategies.BucketMOOStrategy",
                     "init_args": {"solver": "mgda", "stage": 2, "reduce_bucket_size": 20000}},
        "model": model,
        "data": {"train_languages": ["deu", "rus"], "max_length": 48, "batch_size": 4, "max_eval_examples": 8},
    }
    path = out / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(*args: str, returncode: int = 0) -> str:
    """``python -m lightning_moo.cli ARGS`` (or any script) in its own session, killed at the timeout."""
    command = list(args) if args[0].endswith(".py") else ["-m", "lightning_moo.cli", *args]
    result = launch(*command)
    assert result.returncode == returncode, result.stdout[-4000:]
    return result.stdout


def export(*args: str) -> None:
    """``lightning-moo export ARGS`` in this process (the configs name the test callbacks: importable)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(DISTRIBUTED))
        main(["export", *map(str, args)])


def refused(capsys, *args: str) -> str:
    """The one-line error of an export that must fail with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        export(*args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("lightning-moo export: error: ")
    return error


def fit(out: Path, run_name: str, peft: dict | None) -> tuple[Path, Path, Path]:
    cfg = config(out, run_name, peft)
    run("fit", "--config", str(cfg))
    return cfg, out / "checkpoints" / f"step={STEPS}.ckpt", out / f"{run_name}.pt"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return fit(tmp_path_factory.mktemp("lora"), "lora", LORA)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return fit(tmp_path_factory.mktemp("full"), "full", None)


def trained_module(params: Path, peft: dict | None) -> MultilingualLM:
    """The reference: the module rebuilt from the model arguments with SaveParams' final weights."""
    module = MultilingualLM(**MODEL, peft=peft)
    module.model.load_state_dict(torch.load(params))
    return module.eval()


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def zero_to_fp32(checkpoint: Path, out: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's own script, as copied into the checkpoint directory, run on it."""
    run(str(checkpoint / "zero_to_fp32.py"), str(checkpoint), str(out), "--safe_serialization")
    return load_file(out / "model.safetensors")


@pytest.mark.slow
def test_the_merged_export_loads_with_transformers_and_gives_the_trained_logits(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, checkpoint, params = lora_run
    out = tmp_path / "hf"
    # Through the real command line once: the console line says what was written where.
    printed = run("export", "--config", str(cfg), "--ckpt_path", str(checkpoint), "--out", str(out))
    assert f"wrote the model (adapter merged into the base) and the tokenizer from {checkpoint} to {out}" in printed
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "adapter_config.json").exists()
    reference = trained_module(params, LORA)
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(exported).__name__ == "LlamaForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("Mëß").input_ids == reference.tokenizer("Mëß").input_ids
    torch.testing.assert_close(logits(exported, tokenizer), logits(reference.model, reference.tokenizer), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_the_adapter_export_loads_with_peft_on_its_written_base_and_gives_the_trained_logits(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, checkpoint, params = lora_run
    out = tmp_path / "adapter"
    # From the config.yaml that fit saved (it holds fit's ckpt_path: null, and every default).
    export("--config", cfg.parent / "config.yaml", "--ckpt_path", checkpoint, "--out", out, "--adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "base"} <= {p.name for p in out.iterdir()}
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(out.resolve() / "base")  # built from model_config: the base exists nowhere else
    reference = trained_module(params, LORA)
    exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    torch.testing.assert_close(logits(exported, tokenizer), logits(reference.model, reference.tokenizer), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_the_adapter_weights_are_deepspeeds_own_consolidation(lora_run, tmp_path):
    cfg, checkpoint, _ = lora_run
    export("--config", cfg, "--ckpt_path", checkpoint, "--out", tmp_path / "adapter", "--adapter")
    exported = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    # Lightning module names (model.<peft name>, adapter "default") -> peft's saved names.
    expected = {name.removeprefix("model.").replace(".default.", "."): tensor
                for name, tensor in zero_to_fp32(checkpoint, tmp_path / "zero").items()}
    assert exported.keys() == expected.keys() and len(exported) == 2 * 5 * MODEL["model_config"]["num_hidden_layers"]
    # LoRA's B starts at zero: these are the trained weights, not a fresh adapter's.
    assert all(tensor.any() for name, tensor in exported.items() if "lora_B" in name)
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name


@pytest.mark.slow
def test_a_full_fine_tune_exports_deepspeeds_own_consolidation_and_its_logits(full_run, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg, checkpoint, params = full_run
    export("--config", cfg, "--ckpt_path", checkpoint, "--out", tmp_path / "hf")
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    expected = {name.removeprefix("model."): tensor for name, tensor in zero_to_fp32(checkpoint, tmp_path / "zero").items()}
    assert exported.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name
    reference = trained_module(params, None)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(logits(loaded, reference.tokenizer), logits(reference.model, reference.tokenizer), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_checkpoint_of_another_lora_config_is_refused(lora_run, tmp_path, capsys):
    cfg, checkpoint, _ = lora_run
    other = tmp_path / "other.yaml"
    settings = yaml.safe_load(cfg.read_text())
    settings["model"]["peft"]["target_modules"] = ["q_proj", "v_proj"]
    other.write_text(yaml.safe_dump(settings))
    error = refused(capsys, "--config", other, "--ckpt_path", checkpoint, "--out", tmp_path / "hf")
    assert f"{checkpoint} trained other parameters than this config's model trains" in error
    assert "export with the config (model and model.peft) the checkpoint was trained with" in error
    settings["model"]["peft"] = {**LORA, "r": 8}  # the same parameter names, other shapes
    other.write_text(yaml.safe_dump(settings))
    error = refused(capsys, "--config", other, "--ckpt_path", checkpoint, "--out", tmp_path / "hf")
    assert f"{checkpoint} does not fit this config's model (" in error and "size mismatch" in error
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_a_missing_checkpoint_fails_in_one_line_with_status_2(tmp_path):
    cfg = config(tmp_path, "run", LORA)
    output = run("export", "--config", str(cfg), "--ckpt_path", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "hf"),
                 returncode=2)
    assert f"lightning-moo export: error: --ckpt_path {tmp_path / 'nope.ckpt'} does not exist" in output
    assert "Traceback" not in output


# --- in this process, no training: single-file (DDP) checkpoints and refusals ---------------------

def single_file_checkpoint(path: Path, module: MultilingualLM) -> None:
    """What Lightning writes for a DDP run: the module's state_dict through its own checkpoint hook."""
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)


def test_a_single_file_checkpoint_exports_its_adapter(tmp_path):
    module = MultilingualLM(**MODEL, peft=LORA)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.normal_()
    single_file_checkpoint(tmp_path / "ddp.ckpt", module)
    export("--config", config(tmp_path, "ddp", LORA), "--ckpt_path", tmp_path / "ddp.ckpt", "--out", tmp_path / "adapter",
           "--adapter")
    exported = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    trained = {name.replace(".default.", "."): p for name, p in module.model.named_parameters() if p.requires_grad}
    assert exported.keys() == trained.keys()
    for name, parameter in trained.items():
        assert torch.equal(exported[name], parameter), name


def test_a_checkpoint_with_parameters_the_model_lacks_is_refused(tmp_path, capsys):
    module = MultilingualLM(**MODEL)
    checkpoint = {"state_dict": {**module.state_dict(), "model.lm_head.extra": torch.zeros(1)}}
    torch.save(checkpoint, tmp_path / "ddp.ckpt")
    error = refused(capsys, "--config", config(tmp_path, "ddp", None), "--ckpt_path", tmp_path / "ddp.ckpt",
                    "--out", tmp_path / "hf")
    assert "holds 1 parameters this config's model does not have (e.g. ['model.lm_head.extra'])" in error


def test_adapter_without_peft_is_refused_before_the_model_is_built(tmp_path, capsys):
    (tmp_path / "any.ckpt").touch()
    error = refused(capsys, "--config", config(tmp_path, "full", None), "--ckpt_path", tmp_path / "any.ckpt",
                    "--out", tmp_path / "hf", "--adapter")
    assert "--adapter needs an adapter, but the config sets no model.peft" in error


def test_a_missing_checkpoint_or_a_used_out_directory_is_refused(tmp_path, capsys):
    cfg = config(tmp_path, "run", LORA)
    error = refused(capsys, "--config", cfg, "--ckpt_path", tmp_path / "nope.ckpt", "--out", tmp_path / "hf")
    assert f"--ckpt_path {tmp_path / 'nope.ckpt'} does not exist" in error
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").touch()
    error = refused(capsys, "--config", cfg, "--ckpt_path", cfg, "--out", tmp_path / "hf")
    assert f"--out {tmp_path / 'hf'} exists and is not an empty directory" in error


def test_an_adapter_on_a_local_pretrained_model_points_at_that_directory(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tmp_path / "pretrained"
    MultilingualLM(**MODEL).model.save_pretrained(base)
    model = {"pretrained": str(base), "tokenizer": "bytes", "peft": LORA}
    module = MultilingualLM(**model).eval()
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.normal_(std=0.1)
    single_file_checkpoint(tmp_path / "ddp.ckpt", module)
    cfg = config(tmp_path, "ddp", None)
    cfg.write_text(yaml.safe_dump({**yaml.safe_load(cfg.read_text()), "model": model}))
    export("--config", cfg, "--ckpt_path", tmp_path / "ddp.ckpt", "--out", tmp_path / "adapter", "--adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    assert not (tmp_path / "adapter" / "base").exists()  # the base is where the config says
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(loaded, module.tokenizer), logits(module.model, module.tokenizer), rtol=0, atol=1e-5)
