"""``configs/demo_zero3.yaml`` end to end (2 gloo ranks, a few steps): bucket-level MGDA inside ZeRO-3
trains every language, ConflictMonitor shows the buckets by layer, and a run resumed from its sharded
checkpoint reaches the straight run's weights and losses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from test_cli import REPO, cli, scalars

LANGUAGES = ["deu", "rus"]
STEPS = 6


def zero3_config(out: Path, run: str) -> Path:
    """The shipped ZeRO-3 demo config, shortened: 2 languages, STEPS steps, checkpoints every 2 steps."""
    cfg = yaml.safe_load((REPO / "configs" / "demo_zero3.yaml").read_text())
    trainer = cfg["trainer"]
    trainer.update(devices=2, max_steps=STEPS, val_check_interval=3, limit_val_batches=2, log_every_n_steps=1,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out))
    trainer["logger"]["init_args"].update(save_dir=str(out / "logs"), name=run, version=0)
    trainer["callbacks"] = [
        {"class_path": "lightning_moo.callbacks.ConflictMonitor", "init_args": {"log_every_n_steps": 1, "image_every_n_steps": 100}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(out / "checkpoints"), "filename": "{step}", "every_n_train_steps": 2, "save_top_k": -1}},
        {"class_path": "cli_callbacks.SaveParams", "init_args": {"path": str(out / f"{run}.pt")}},
    ]
    cfg["data"].update(train_languages=LANGUAGES, unseen_languages=["fra"], max_eval_examples=8)
    path = out / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3_straight")
    cli("fit", "--config", str(zero3_config(out, "straight")))
    return out


def test_zero3_demo_trains_every_language_and_monitors_its_buckets(straight):
    logged = scalars(straight / "logs" / "straight" / "version_0")
    for language in LANGUAGES:
        losses = logged[f"train/loss_{language}"]
        assert sorted(losses) == list(range(STEPS)) and losses[STEPS - 1] < losses[0]
    # The monitor read ZeRO-3's buckets: parameter names placed them in the model's layer groups.
    for group in ("attention", "mlp", "embeddings", "global"):
        cosines = logged[f"conflict/{group}/cosine_mean"]
        assert sorted(cosines) == list(range(STEPS)) and all(-1 <= c <= 1 for c in cosines.values()), group
    assert all(0 <= r <= 1 for r in logged["conflict/global/conflict_ratio"].values())


def test_zero3_resume_from_the_sharded_checkpoint_reaches_the_same_weights_and_losses(straight, tmp_path):
    cli("fit", "--config", str(zero3_config(tmp_path, "resumed")), "--ckpt_path", str(straight / "checkpoints" / "step=4.ckpt"))
    expected, resumed = torch.load(straight / "straight.pt"), torch.load(tmp_path / "resumed.pt")
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(resumed[name], expected[name]), name
    reference = scalars(straight / "logs" / "straight" / "version_0")
    after = scalars(tmp_path / "logs" / "resumed" / "version_0")
    for language in LANGUAGES:
        for step in range(4, STEPS):
            assert after[f"train/loss_{language}"][step] == reference[f"train/loss_{language}"][step]
