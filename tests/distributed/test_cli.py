"""``lightning-moo`` end to end in subprocesses, 2 gloo ranks, tiny model on the built-in corpus:
fit, validate from the checkpoint, and resume after SIGKILL to the same weights and losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LANGUAGES = ["deu", "rus"]
STEPS = 6
TIMEOUT = 300


def config(out: Path, run: str, extra_callbacks=(), devices: int = 2) -> Path:
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(out / "checkpoints"), "filename": "{step}", "every_n_train_steps": 2,
                       "save_top_k": -1}},
        {"class_path": "cli_callbacks.SaveParams", "init_args": {"path": str(out / f"{run}.pt")}},
        *extra_callbacks,
    ]
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": devices, "max_steps": STEPS, "val_check_interval": 3,
            "limit_val_batches": 2, "log_every_n_steps": 1, "enable_progress_bar": False,
            "enable_model_summary": False, "num_sanity_val_steps": 0,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(out / "logs"), "name": run, "version": 0}},
            "callbacks": callbacks,
        },
        "strategy": {"class_path": "lightning_moo.strategies.BucketMOOStrategy",
                     "init_args": {"solver": {"class_path": "lightning_moo.solvers.MGDA"}, "stage": 2,
                                   "reduce_bucket_size": 20000}},
        "model": {"model_config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1},
                  "lr": 3e-3, "warmup_steps": 2},
        "data": {"train_languages": LANGUAGES, "unseen_languages": ["fra"], "max_length": 48, "batch_size": 4,
                 "max_eval_examples": 8},
    }
    path = out / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli_env(*paths: Path) -> dict[str, str]:
    """The environment of a CLI subprocess: no rank variables of an enclosing run, one thread, and
    the repository, this folder (the test callbacks) and ``paths`` importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), str(HERE), *map(str, paths), env.get("PYTHONPATH", "")]))
    return env


def launch(*command: str) -> subprocess.CompletedProcess:
    """``python COMMAND`` in a new session, so that a hang or a killed rank zero never leaves its peer
    rank behind: the whole session is killed once it returns or times out."""
    proc = subprocess.Popen([sys.executable, *command], env=cli_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, output)


def cli(*args: str, expect_kill: bool = False, expect_fail: bool = False) -> subprocess.CompletedProcess:
    result = launch("-m", "lightning_moo.cli", *args)
    code, output = result.returncode, result.stdout
    if expect_kill:
        assert code == -signal.SIGKILL, output[-4000:]
    elif expect_fail:
        assert code > 0, output[-4000:]
    else:
        assert code == 0, output[-4000:]
    return result


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


# Parallel sentences for the analysis callbacks, which run on rank zero only while the other rank waits.
TEXTS = {
    "deu": ["Das Wetter ist heute schön.", "Ich lese ein Buch.", "Der Zug kommt spät.", "Wir essen zu Abend."],
    "rus": ["Сегодня хорошая погода.", "Я читаю книгу.", "Поезд опаздывает.", "Мы ужинаем."],
}
ANALYSIS = [
    {"class_path": "lightning_moo.callbacks.Silhouette", "init_args": {"texts": TEXTS, "run_at": ["fit_end"]}},
    {"class_path": "lightning_moo.callbacks.NeuronSpecificity", "init_args": {"texts": TEXTS, "run_at": ["fit_end"], "top_share": 0.1}},
    {"class_path": "lightning_moo.callbacks.ConflictMonitor", "init_args": {"log_every_n_steps": 1, "image_every_n_steps": 100}},
]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = cli("fit", "--config", str(config(out, "straight", extra_callbacks=ANALYSIS)))
    return out, result


def test_fit_logs_every_language_and_validates_seen_and_unseen(straight):
    out, result = straight
    logged = scalars(out / "logs" / "straight" / "version_0")
    for language in LANGUAGES:
        assert sorted(logged[f"train/loss_{language}"]) == list(range(STEPS))
    for name in [f"val/bpb_{x}" for x in LANGUAGES + ["fra", "seen", "unseen"]]:
        assert len(logged[name]) == 2 and all(v > 0 for v in logged[name].values()), name
    # The languages pull the shared model apart, yet each one's loss falls.
    for language in LANGUAGES:
        losses = logged[f"train/loss_{language}"]
        assert losses[STEPS - 1] < losses[0]
    assert "run summary" in result.stdout and "checkpoints" in result.stdout
    # The analysis callbacks ran on rank zero of a 2-rank run without hanging the other rank.
    assert "silhouette/cosine/layer_0" in logged
    assert list((out / "logs" / "straight" / "version_0" / "language_neurons").glob("step_*.pt"))


def test_the_monitor_mirrors_each_languages_losses_into_its_own_run_at_the_same_steps(straight):
    out, _ = straight
    version = out / "logs" / "straight" / "version_0"
    logged = scalars(version)
    for language in LANGUAGES:
        run = scalars(version / "language" / language)
        assert run["by_language/train_loss"] == pytest.approx(logged[f"train/loss_{language}"], rel=1e-6)
        assert run["by_language/val_bpb"] == pytest.approx(logged[f"val/bpb_{language}"], rel=1e-6)
        assert sorted(run["by_language/solver_weight"]) == list(range(STEPS))
    unseen = scalars(version / "language" / "fra")  # an evaluation-only language gets a run too
    assert unseen == {"by_language/val_bpb": pytest.approx(logged["val/bpb_fra"], rel=1e-6)}


def test_validate_from_checkpoint_reproduces_the_in_run_validation(straight):
    out, _ = straight
    run_config = config(out, "validate")
    cli("validate", "--config", str(run_config), "--ckpt_path", str(out / "checkpoints" / f"step={STEPS}.ckpt"))
    in_run = scalars(out / "logs" / "straight" / "version_0")
    again = scalars(out / "logs" / "validate" / "version_0")
    for tag in [f"val/bpb_{x}" for x in LANGUAGES + ["fra"]]:
        assert list(again[tag].values())[0] == pytest.approx(in_run[tag][max(in_run[tag])], rel=1e-6), tag


def test_predictions_add_up_to_the_test_metrics(straight):
    """predict writes per-example bits and bytes; per language their sums give test's bits per byte."""
    out, _ = straight
    checkpoint = str(out / "checkpoints" / f"step={STEPS}.ckpt")
    cli("test", "--config", str(config(out, "test")), "--ckpt_path", checkpoint)
    result = cli("predict", "--config", str(config(out, "predict")), "--ckpt_path", checkpoint)
    assert "predictions (one JSON line per example, per rank)" in result.stdout
    tested = scalars(out / "logs" / "test" / "version_0")
    rows = [json.loads(line) for path in sorted((out / "logs" / "predict" / "version_0" / "predictions").glob("*.jsonl"))
            for line in path.read_text().splitlines()]
    for language in LANGUAGES + ["fra"]:
        mine = [r for r in rows if r["language"] == language]
        assert len(mine) == 8  # max_eval_examples, split over the two ranks without repeats
        bpb = sum(r["bits"] for r in mine) / sum(r["bytes"] for r in mine)
        assert bpb == pytest.approx(list(tested[f"test/bpb_{language}"].values())[0], rel=1e-5), language


def test_resume_after_sigkill_reaches_the_same_weights_and_losses(straight, tmp_path):
    out, _ = straight
    killed = config(tmp_path, "resumed", extra_callbacks=[{"class_path": "cli_callbacks.KillAt", "init_args": {"step": 4}}])
    cli("fit", "--config", str(killed), expect_kill=True)
    checkpoint = tmp_path / "checkpoints" / "step=4.ckpt"
    assert checkpoint.exists() and not (tmp_path / "resumed.pt").exists()
    cli("fit", "--config", str(config(tmp_path, "resumed")), "--ckpt_path", str(checkpoint))

    expected, resumed = torch.load(out / "straight.pt"), torch.load(tmp_path / "resumed.pt")
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=0, msg=name)
    reference = scalars(out / "logs" / "straight" / "version_0")
    after = scalars(tmp_path / "logs" / "resumed" / "version_0")
    for language in LANGUAGES:
        tag = f"train/loss_{language}"
        for step in range(4, STEPS):
            assert after[tag][step] == reference[tag][step], (tag, step)
    assert after["val/bpb_seen"][STEPS - 1] == reference["val/bpb_seen"][STEPS - 1]


def test_one_process_training_both_languages_matches_the_two_rank_run(straight, tmp_path):
    """Many languages per device: the same languages, data, seed and buckets in one process."""
    out, _ = straight
    cli("fit", "--config", str(config(tmp_path, "single", devices=1)))
    expected, single = torch.load(out / "straight.pt"), torch.load(tmp_path / "single.pt")
    for name in expected:
        torch.testing.assert_close(single[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    reference = scalars(out / "logs" / "straight" / "version_0")
    logged = scalars(tmp_path / "logs" / "single" / "version_0")
    for language in LANGUAGES:
        tag = f"train/loss_{language}"
        assert list(logged[tag].values()) == pytest.approx(list(reference[tag].values()), rel=1e-5)


def test_loss_weighting_by_name_trains_and_logs_its_weights(tmp_path):
    """``--strategy.solver=gls``: the GLS weights of each step's per-language losses are logged, and
    they are the geometric-mean weights of the logged losses (w_t = (Π L)^(1/T) / (T L_t))."""
    cli("fit", "--config", str(config(tmp_path, "gls")), "--strategy.solver=gls", "--trainer.max_steps=3",
        "--trainer.val_check_interval=3")
    logged = scalars(tmp_path / "logs" / "gls" / "version_0")
    for step in range(3):
        losses = torch.tensor([logged[f"train/loss_{language}"][step] for language in LANGUAGES], dtype=torch.float64)
        weights = torch.tensor([logged[f"train/loss_weight_{language}"][step] for language in LANGUAGES], dtype=torch.float64)
        expected = losses.prod() ** (1 / len(LANGUAGES)) / (len(LANGUAGES) * losses)
        torch.testing.assert_close(weights, expected, rtol=1e-5, atol=0)
