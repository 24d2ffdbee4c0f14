"""``--ckpt_path`` is checked before anything heavy is built (lightning_moo.resume_checks): a missing,
incomplete or truncated checkpoint, another world size or language list fail in seconds with the file
or setting and the fix; a changed max_steps (schedule, lr, solver) is one warning line.

Unit tests on hand-made files first; then 2-rank runs of the CLI against damaged copies of one
straight run's checkpoints (steps 2, 4, 6)."""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import Namespace

from lightning_moo.cli import MOOCLI
from lightning_moo.data import MultilingualDataModule
from lightning_moo.module import MultilingualLM
from lightning_moo.resume_checks import (
    RUN,
    ResumeCheckError,
    check_resume,
    config_solver,
    run_record,
)
from lightning_moo.solvers import MGDA, CAGrad

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from test_cli import cli, config  # noqa: E402

MGDA_PATH = f"{MGDA.__module__}.{MGDA.__qualname__}"
RECORD = {"train_languages": ["deu", "rus"], "world_size": 2, "solver": MGDA_PATH, "max_steps": 6,
          "schedule": "cosine", "lr": 3e-3, "warmup_steps": 2}


def fit_config(devices=2, nodes=1, languages=("deu", "rus"), max_steps=6, solver="lightning_moo.solvers.MGDA",
               lr=3e-3, other_languages=False) -> Namespace:
    """The part of a parsed ``fit`` config that the checks read."""
    return Namespace(
        trainer=Namespace(devices=devices, num_nodes=nodes, max_steps=max_steps),
        data=Namespace(train_languages=list(languages)),
        strategy=Namespace(class_path="lightning_moo.strategies.BucketMOOStrategy",
                           init_args=Namespace(solver=Namespace(class_path=solver, init_args=Namespace()))),
        model=Namespace(lr=lr, schedule="cosine", warmup_steps=2),
        resume_with_other_languages=other_languages,
    )


def deepspeed_checkpoint(folder: Path, name: str = "step=4.ckpt", world_size: int = 2, record=RECORD) -> Path:
    """A DeepSpeed checkpoint directory's layout with small stand-in files."""
    path = folder / name
    (path / "checkpoint").mkdir(parents=True)
    (path / "latest").write_text("checkpoint")
    torch.save({"module": {"w": torch.zeros(3)}, "dp_world_size": world_size, RUN: record},
               path / "checkpoint" / "mp_rank_00_model_states.pt")
    for rank in range(world_size):
        torch.save({"optimizer_state_dict": {"p": torch.zeros(1000)}},
                   path / "checkpoint" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    return path


def refused(path, config=None, subcommand="fit") -> str:
    with pytest.raises(ResumeCheckError) as error:
        check_resume(path, config if config is not None else fit_config(), subcommand)
    assert error.value.code == 2
    return error.value.message


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


# ------------------------------------------------------------------------------------ unit tests
def test_a_complete_checkpoint_with_the_same_settings_passes_silently(tmp_path, capsys):
    check_resume(deepspeed_checkpoint(tmp_path), fit_config(), "fit")
    assert capsys.readouterr().err == ""


def test_a_missing_path_is_named_with_the_checkpoints_beside_it(tmp_path):
    deepspeed_checkpoint(tmp_path, "step=2.ckpt")
    (tmp_path / "step=4.ckpt").write_bytes(b"x")
    deepspeed_checkpoint(tmp_path, "step=6.ckpt.partial")  # a save in progress or killed: not offered
    message = refused(tmp_path / "step=5.ckpt")
    assert f"--ckpt_path {tmp_path / 'step=5.ckpt'} does not exist" in message
    assert f"Checkpoints in {tmp_path}: step=2.ckpt, step=4.ckpt." in message


def test_the_folder_of_checkpoints_is_not_a_checkpoint(tmp_path):
    deepspeed_checkpoint(tmp_path, "step=2.ckpt")
    assert "is a folder of checkpoints.\nFix: pass one of them: step=2.ckpt." in refused(tmp_path)


@pytest.mark.parametrize("value", ["last", "hpc", "best", "registry:model:latest"])
def test_lightnings_special_values_are_left_to_lightning(value):
    check_resume(value, fit_config(), "fit")


def test_a_missing_latest_file_says_how_to_name_a_complete_tag(tmp_path):
    path = deepspeed_checkpoint(tmp_path)
    deepspeed_checkpoint(tmp_path, "step=2.ckpt")
    (path / "latest").unlink()
    message = refused(path)
    assert f"{path / 'latest'} is missing" in message
    assert "step=2.ckpt" in message and f"echo checkpoint > {path / 'latest'}" in message


def test_latest_naming_a_missing_tag_is_refused(tmp_path):
    path = deepspeed_checkpoint(tmp_path)
    (path / "latest").write_text("global_step4\n")
    assert f"names the tag 'global_step4', but {path / 'global_step4'} does not exist" in refused(path)


@pytest.mark.parametrize("damage, says", [
    (Path.unlink, "is missing (the model states)"),
    (lambda f: f.write_bytes(b""), "is empty (the model states, 0 bytes)"),
    (truncate, "cannot be read (the model states:"),
])
def test_a_missing_empty_or_truncated_model_states_file_is_named(tmp_path, damage, says):
    path = deepspeed_checkpoint(tmp_path)
    damage(path / "checkpoint" / "mp_rank_00_model_states.pt")
    message = refused(path)
    assert f"{path / 'checkpoint' / 'mp_rank_00_model_states.pt'} {says}" in message
    assert "\nFix: resume from another checkpoint." in message


@pytest.mark.parametrize("damage, says", [(Path.unlink, "is missing"), (truncate, "cannot be read")])
def test_every_ranks_optimizer_shard_must_load_for_fit_only(tmp_path, damage, says):
    path = deepspeed_checkpoint(tmp_path)
    shard = path / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    damage(shard)
    assert f"{shard} {says} (the optimizer shard of rank 1 of 2" in refused(path)
    for evaluation in ("validate", "test", "predict"):  # they load the weights only
        check_resume(path, fit_config(), evaluation)


def test_a_single_file_checkpoint_must_load(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(100)}, RUN: RECORD}, path)
    check_resume(path, fit_config(), "fit")
    truncate(path)
    assert f"{path} cannot be read (the checkpoint:" in refused(path)


def test_another_world_size_is_refused_with_the_saved_one(tmp_path):
    path = deepspeed_checkpoint(tmp_path)
    message = refused(path, fit_config(devices=1))
    assert "saved by 2 processes, this run has 1 (trainer.devices=1 x trainer.num_nodes=1)" in message
    assert "Fix: resume with trainer.devices x trainer.num_nodes = 2" in message
    check_resume(path, fit_config(devices=1, nodes=2), "fit")  # the same world size, split otherwise
    check_resume(path, fit_config(devices="auto"), "fit")  # not known before the Trainer: not checked
    check_resume(path, fit_config(devices=1), "validate")


def test_a_checkpoint_without_the_record_is_checked_by_deepspeeds_world_size(tmp_path):
    path = deepspeed_checkpoint(tmp_path, record=None)
    assert "saved by 2 processes, this run has 4" in refused(path, fit_config(devices=4))


def test_another_language_list_is_refused_unless_asked_for(tmp_path, capsys):
    path = deepspeed_checkpoint(tmp_path)
    for languages in (["deu", "fra"], ["rus", "deu"], ["deu"]):
        message = refused(path, fit_config(languages=languages))
        assert f"the checkpoint trained data.train_languages [deu, rus], this run [{', '.join(languages)}]" in message
        assert "--resume_with_other_languages true" in message
    check_resume(path, fit_config(languages=["deu", "fra"], other_languages=True), "fit")
    err = capsys.readouterr().err.splitlines()
    assert err == ["lightning-moo: warning: the checkpoint trained data.train_languages [deu, rus], this run "
                   "[deu, fra]: resuming with the new list, as --resume_with_other_languages asks"]


def test_changed_settings_are_one_warning_line_each_on_rank_zero_only(tmp_path, capsys, monkeypatch):
    path = deepspeed_checkpoint(tmp_path)
    changed = fit_config(max_steps=8, lr=1e-3, solver="lightning_moo.solvers.CAGrad")
    check_resume(path, changed, "fit")
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        f"lightning-moo: warning: strategy.solver was {MGDA_PATH} in the checkpoint's run, is "
        f"{CAGrad.__module__}.CAGrad now: the new solver weighs the languages from here on",
        "lightning-moo: warning: trainer.max_steps was 6 in the checkpoint's run, is 8 now: the cosine "
        "learning-rate schedule is stretched to the new length from here on",
        "lightning-moo: warning: model.lr was 0.003 in the checkpoint's run, is 0.001 now: no effect: the "
        "restored scheduler keeps the checkpoint's base learning rate",
    ]
    monkeypatch.setattr("lightning_moo.resume_checks.rank_zero_only.rank", 1)
    check_resume(path, changed, "fit")
    assert capsys.readouterr().err == ""


def test_the_default_solver_is_compared_as_the_one_the_strategy_builds():
    no_solver = fit_config()
    no_solver.strategy.init_args.solver = None
    assert config_solver(no_solver) == MGDA_PATH == config_solver(fit_config())
    stock = fit_config()
    stock.strategy = Namespace(class_path="lightning_moo.strategies.StockDeepSpeedStrategy", init_args=Namespace(stage=2))
    assert config_solver(stock) is None


def test_the_record_names_what_the_checks_compare():
    class Trainer:
        datamodule = Namespace(train_languages=("deu", "rus"))
        strategy = Namespace(solver=MGDA())
        world_size, max_steps = 2, 6

    hparams = {"lr": 3e-3, "schedule": "cosine", "warmup_steps": 2}
    assert run_record(Trainer(), hparams) == RECORD


def test_the_cli_refuses_before_building_the_model(tmp_path, capsys):
    start = time.monotonic()
    with pytest.raises(SystemExit) as error:
        MOOCLI(MultilingualLM, MultilingualDataModule, trainer_defaults={"use_distributed_sampler": False},
               args=["fit", "--data.train_languages", "[deu, rus]", "--trainer.accelerator", "cpu",
                     "--model.pretrained", "no/such-model", "--ckpt_path", str(tmp_path / "gone.ckpt")])
    assert error.value.code == 2 and time.monotonic() - start < 5
    assert capsys.readouterr().err.splitlines() == [
        f"lightning-moo: error: --ckpt_path {tmp_path / 'gone.ckpt'} does not exist.",
        f"Fix: pass an existing checkpoint. There is no other checkpoint in {tmp_path}.",
    ]


# ---------------------------------------------------------------------- 2-rank runs of the CLI
# Without the checks these damaged checkpoints failed 13-14 s into the run on 2 idle cores (~25 s on
# a busy machine), once the tiny model was built and DeepSpeed initialised on both ranks; with them,
# right after the imports and the parsing (6-10 s measured here, most of it importing). The bound is
# loose for a busy machine; that no rank was started is checked exactly (GLOBAL_RANK below).
FAST = 15
TIMEOUT = 300


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume_straight")
    cli("fit", "--config", str(config(out, "straight")))
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step=2.ckpt", "step=4.ckpt", "step=6.ckpt"]
    return checkpoints


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def damaged(straight, tmp_path):
    """A copy of the straight run's checkpoints; afterwards, the originals are as they were."""
    before = digest(straight)
    copy = tmp_path / "checkpoints"
    shutil.copytree(straight, copy)
    yield copy
    assert digest(straight) == before


def resume(out: Path, checkpoint: Path, *args: str, expect_fail: bool = True, **changes):
    """``fit --ckpt_path checkpoint`` with the straight run's config, ``changes`` made to its YAML
    (``trainer__max_steps=8``); returns the output and the seconds it took."""
    path = config(out, "resumed")
    cfg = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        section, name = key.split("__")
        cfg[section][name] = value
    path.write_text(yaml.safe_dump(cfg))
    start = time.monotonic()
    result = cli("fit", "--config", str(path), "--ckpt_path", str(checkpoint), *args, expect_fail=expect_fail)
    elapsed = time.monotonic() - start
    if expect_fail:
        assert result.returncode == 2, result.stdout[-3000:]
        assert elapsed < FAST, f"failed after {elapsed:.1f} s: {result.stdout[-3000:]}"
        assert "Traceback" not in result.stdout, result.stdout[-3000:]
        # Refused by the launching process alone, before Lightning starts the ranks ("initializing
        # deepspeed distributed: GLOBAL_RANK: 0, MEMBER: 1/2") and builds the model.
        assert "GLOBAL_RANK:" not in result.stdout, result.stdout[-3000:]
    return result.stdout, elapsed


def error_lines(output: str) -> list[str]:
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("lightning-moo: error:"))
    return lines[start:]


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("damage, says", [
    ("delete", "is missing (the model states)"),
    ("empty", "is empty (the model states, 0 bytes)"),
])
def test_a_deleted_or_empty_model_states_file_is_named_in_seconds(damaged, tmp_path, damage, says):
    states = damaged / "step=4.ckpt" / "checkpoint" / "mp_rank_00_model_states.pt"
    states.unlink() if damage == "delete" else states.write_bytes(b"")
    output, _ = resume(tmp_path, damaged / "step=4.ckpt")
    assert error_lines(output) == [
        f"lightning-moo: error: {states} {says}: the checkpoint is incomplete or damaged.",
        f"Fix: resume from another checkpoint. Checkpoints in {damaged}: step=2.ckpt, step=6.ckpt.",
    ]


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT)
def test_a_truncated_optimizer_shard_is_named_in_seconds(damaged, tmp_path):
    shard = damaged / "step=4.ckpt" / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    truncate(shard)
    output, _ = resume(tmp_path, damaged / "step=4.ckpt")
    first, fix = error_lines(output)
    assert first.startswith(f"lightning-moo: error: {shard} cannot be read (the optimizer shard of rank 1 of 2: ")
    assert fix == f"Fix: resume from another checkpoint. Checkpoints in {damaged}: step=2.ckpt, step=6.ckpt."


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT)
def test_a_missing_latest_file_is_named_in_seconds(damaged, tmp_path):
    checkpoint = damaged / "step=4.ckpt"
    (checkpoint / "latest").unlink()
    output, _ = resume(tmp_path, checkpoint)
    first, fix = error_lines(output)
    assert first.startswith(f"lightning-moo: error: {checkpoint / 'latest'} is missing")
    assert fix.startswith(f"Fix: resume from another checkpoint. Checkpoints in {damaged}: step=2.ckpt, step=6.ckpt.")
    assert fix.endswith(f"echo checkpoint > {checkpoint / 'latest'}.")


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT)
def test_another_world_size_is_refused_in_seconds(damaged, tmp_path):
    # One device training both languages is a valid layout (a fit of it runs): only the world size differs.
    output, _ = resume(tmp_path, damaged / "step=4.ckpt", trainer__devices=1)
    first, fix = error_lines(output)
    assert "the checkpoint was saved by 2 processes, this run has 1 (trainer.devices=1 x trainer.num_nodes=1)" in first
    assert fix.startswith("Fix: resume with trainer.devices x trainer.num_nodes = 2")


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT)
def test_another_language_list_is_refused_in_seconds_and_resumes_when_asked(damaged, tmp_path):
    languages = ["rus", "deu"]  # the same languages, in another order: other ranks train them
    (tmp_path / "refused").mkdir()
    output, _ = resume(tmp_path / "refused", damaged / "step=4.ckpt", data__train_languages=languages)
    first, fix = error_lines(output)
    assert first == ("lightning-moo: error: the checkpoint trained data.train_languages [deu, rus], this run "
                     "[rus, deu] (their order decides which rank trains which language).")
    assert fix.endswith("or pass --resume_with_other_languages true to continue its weights on the new one.")

    output, _ = resume(tmp_path, damaged / "step=4.ckpt", "--resume_with_other_languages", "true",
                       expect_fail=False, data__train_languages=languages)
    warning = ("lightning-moo: warning: the checkpoint trained data.train_languages [deu, rus], this run [rus, deu]: "
               "resuming with the new list, as --resume_with_other_languages asks")
    assert output.splitlines().count(warning) == 1  # once, not once per rank
    assert "GLOBAL_RANK:" in output  # what the refusals show they never reached
    assert "global step: 6" in output


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT)
def test_a_changed_max_steps_resumes_with_one_warning_line(damaged, tmp_path):
    output, _ = resume(tmp_path, damaged / "step=6.ckpt", expect_fail=False, trainer__max_steps=7)
    warnings = [line for line in output.splitlines() if line.startswith("lightning-moo: warning:")]
    assert warnings == ["lightning-moo: warning: trainer.max_steps was 6 in the checkpoint's run, is 7 now: the "
                        "cosine learning-rate schedule is stretched to the new length from here on"]
    assert "global step: 7" in output
