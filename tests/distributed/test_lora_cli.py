"""``configs/demo_lora.yaml`` end to end (2 gloo ranks, a few steps): LoRA on the demo model trains
the adapter only, checkpoints hold the adapter only and resume after SIGKILL to the same weights
and losses, one process training both languages matches two ranks, DDP checkpoints hold the adapter
only too, and a checkpoint of another adapter config is refused with the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from test_cli import REPO, cli, scalars

LANGUAGES = ["deu", "rus"]
STEPS = 6


def lora_config(out: Path, run: str, devices: int = 2, kill_at: int | None = None, strategy: dict | None = None,
                target_modules: list[str] | None = None) -> Path:
    """The shipped LoRA demo config, shortened: 2 languages, STEPS steps, checkpoints every 2 steps."""
    cfg = yaml.safe_load((REPO / "configs" / "demo_lora.yaml").read_text())
    trainer = cfg["trainer"]
    trainer.update(devices=devices, max_steps=STEPS, val_check_interval=3, limit_val_batches=2, log_every_n_steps=1,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out))
    trainer["logger"]["init_args"].update(save_dir=str(out / "logs"), name=run, version=0)
    trainer["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(out / "checkpoints"), "filename": "{step}", "every_n_train_steps": 2, "save_top_k": -1}},
        {"class_path": "cli_callbacks.SaveParams", "init_args": {"path": str(out / f"{run}.pt")}},
    ]
    if kill_at is not None:
        trainer["callbacks"].append({"class_path": "cli_callbacks.KillAt", "init_args": {"step": kill_at}})
    if strategy is not None:
        cfg["strategy"] = strategy
    if target_modules is not None:
        cfg["model"]["peft"]["target_modules"] = target_modules
    cfg["data"].update(train_languages=LANGUAGES, unseen_languages=["fra"], max_eval_examples=8)
    path = out / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_straight")
    cli("fit", "--config", str(lora_config(out, "straight")))
    return out


def adapter_and_base(params: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    adapter = {n: p for n, p in params.items() if ".lora_" in n}
    return adapter, {n: p for n, p in params.items() if n not in adapter}


def test_lora_demo_trains_the_adapter_and_checkpoints_only_it(straight, tmp_path):
    out = straight
    logged = scalars(out / "logs" / "straight" / "version_0")
    for language in LANGUAGES:
        losses = logged[f"train/loss_{language}"]
        assert sorted(losses) == list(range(STEPS)) and losses[STEPS - 1] < losses[0]
    # The frozen base is the seed's random init: the same model built afresh, without training.
    from lightning_moo.module import MultilingualLM

    cfg = yaml.safe_load((out / "straight.yaml").read_text())["model"]
    torch.manual_seed(0)
    fresh = MultilingualLM(**cfg)
    trained = torch.load(out / "straight.pt")
    adapter, base = adapter_and_base(trained)
    initial = dict(fresh.model.named_parameters())
    assert adapter and all(torch.equal(base[n], initial[n]) for n in base), "a frozen weight moved"
    assert any(not torch.equal(adapter[n], initial[n]) for n in adapter), "the adapter did not train"
    # The checkpoint holds the adapter's weights and none of the base's.
    states = torch.load(out / "checkpoints" / f"step={STEPS}.ckpt" / "checkpoint" / "mp_rank_00_model_states.pt", weights_only=False)
    assert sorted(states["module"]) == sorted(f"model.{n}" for n in adapter)
    for name, value in adapter.items():
        assert torch.equal(states["module"][f"model.{name}"], value), name


def test_lora_resume_after_sigkill_reaches_the_same_weights_and_losses(straight, tmp_path):
    cli("fit", "--config", str(lora_config(tmp_path, "resumed", kill_at=4)), expect_kill=True)
    cli("fit", "--config", str(lora_config(tmp_path, "resumed")), "--ckpt_path", str(tmp_path / "checkpoints" / "step=4.ckpt"))
    expected, resumed = torch.load(straight / "straight.pt"), torch.load(tmp_path / "resumed.pt")
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(resumed[name], expected[name]), name
    reference = scalars(straight / "logs" / "straight" / "version_0")
    after = scalars(tmp_path / "logs" / "resumed" / "version_0")
    for language in LANGUAGES:
        for step in range(4, STEPS):
            assert after[f"train/loss_{language}"][step] == reference[f"train/loss_{language}"][step]


def test_lora_one_process_training_both_languages_matches_two_ranks(straight, tmp_path):
    cli("fit", "--config", str(lora_config(tmp_path, "single", devices=1)))
    expected, single = torch.load(straight / "straight.pt"), torch.load(tmp_path / "single.pt")
    for name in expected:
        torch.testing.assert_close(single[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_checkpoint_of_another_adapter_is_refused_with_the_fix(straight, tmp_path):
    config = lora_config(tmp_path, "other", target_modules=["q_proj", "v_proj"])
    result = cli("fit", "--config", str(config), "--ckpt_path", str(straight / "checkpoints" / "step=2.ckpt"), expect_fail=True)
    assert "the checkpoint trained other parameters than this model trains" in result.stdout
    assert "Resume with the model.peft" in result.stdout


def test_lora_under_ddp_checkpoints_the_adapter_and_resumes(tmp_path):
    ddp = {"class_path": "lightning_moo.strategies.BucketMOODDPStrategy",
           "init_args": {"solver": "mgda", "target_buckets": 8, "find_unused_parameters": True}}
    straight = tmp_path / "straight"
    straight.mkdir()
    cli("fit", "--config", str(lora_config(straight, "ddp", strategy=ddp)))
    saved = torch.load(straight / "checkpoints" / f"step={STEPS}.ckpt", weights_only=False)
    adapter, _ = adapter_and_base(torch.load(straight / "ddp.pt"))
    assert sorted(saved["state_dict"]) == sorted(f"model.{n}" for n in adapter)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    cli("fit", "--config", str(lora_config(resumed, "ddp", strategy=ddp)), "--ckpt_path", str(straight / "checkpoints" / "step=4.ckpt"))
    expected, after = torch.load(straight / "ddp.pt"), torch.load(resumed / "ddp.pt")
    for name in expected:
        assert torch.equal(after[name], expected[name]), name
