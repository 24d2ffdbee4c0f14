"""The CLI builds what the command line says: solver swaps, a user's own solver, languages from the data."""

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_moo.cli import MOOCLI
from lightning_moo.data import MultilingualDataModule
from lightning_moo.module import MultilingualLM
from lightning_moo.solvers import CAGrad, MGDA, MOOSolver, NashMTL, UPGrad, solver_names
from lightning_moo.strategies import BucketMOOStrategy, StockDeepSpeedStrategy

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["--model.model_config", '{"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, '
        '"num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}']


class Halves(MOOSolver):
    """A user's solver, named by class_path: half weight on the first language."""

    def weights(self, gram):
        w = gram.new_full((gram.shape[0],), 0.5 / max(gram.shape[0] - 1, 1))
        w[0] = 0.5
        return w


def build(*args):
    return MOOCLI(MultilingualLM, MultilingualDataModule, trainer_defaults={"use_distributed_sampler": False},
                  run=False, args=["--data.train_languages", "[deu, rus]", "--trainer.accelerator", "cpu", *TINY, *args])


def test_default_strategy_is_bucket_mgda_with_the_data_languages():
    cli = build()
    strategy = cli.trainer.strategy
    assert isinstance(strategy, BucketMOOStrategy) and isinstance(strategy.solver, MGDA)
    assert strategy.languages == ["deu", "rus"]
    assert cli.trainer._accelerator_connector.use_distributed_sampler is False


def test_solver_swapped_from_the_command_line():
    strategy = build("--strategy.solver=CAGrad", "--strategy.solver.c=0.4").trainer.strategy
    assert isinstance(strategy.solver, CAGrad) and strategy.solver.c == 0.4


def test_users_own_solver_by_class_path():
    strategy = build(f"--strategy.solver={__name__}.Halves").trainer.strategy
    assert type(strategy.solver).__name__ == "Halves"


def test_stock_deepspeed_baseline_by_class_path():
    strategy = build("--strategy=lightning_moo.strategies.StockDeepSpeedStrategy", "--strategy.stage=2").trainer.strategy
    assert type(strategy) is StockDeepSpeedStrategy


def test_unknown_solver_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        build("--strategy.solver=NoSuchSolver")
    assert "NoSuchSolver" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_parse(name, capsys):
    # --print_config parses and validates the whole file, instantiating nothing (no weights, no data).
    with pytest.raises(SystemExit) as exit_:
        MOOCLI(MultilingualLM, MultilingualDataModule, args=["fit", "--config", str(CONFIGS / name), "--print_config"])
    assert exit_.value.code == 0
    assert "train_languages" in capsys.readouterr().out


# --- solvers by short name; an unknown name fails in a few lines that list the solvers ------------

@pytest.mark.parametrize(
    "args, cls, init",
    [(["--strategy.solver=cagrad", "--strategy.solver.c=0.4"], CAGrad, {"c": 0.4}),
     (["--strategy.solver", "Nash-MTL"], NashMTL, {}),
     (["--strategy.solver.class_path=upgrad"], UPGrad, {}),
     (["--strategy.solver={class_path: cagrad, init_args: {c: 0.7}}"], CAGrad, {"c": 0.7})],
)
def test_solver_by_short_name_on_the_command_line(args, cls, init):
    solver = build(*args).trainer.strategy.solver
    assert type(solver) is cls and all(getattr(solver, k) == v for k, v in init.items())


@pytest.mark.parametrize(
    "solver, cls, init",
    [("mgda", MGDA, {"normalization": "none"}), ("{class_path: cagrad, init_args: {c: 0.4}}", CAGrad, {"c": 0.4}),
     ("{class_path: CAGrad, init_args: {c: 0.3}}", CAGrad, {"c": 0.3})],
)
def test_solver_by_short_name_in_yaml(tmp_path, solver, cls, init):
    config = tmp_path / "config.yaml"
    config.write_text(f"strategy:\n  init_args:\n    solver: {solver}\n")
    solver = build("--config", str(config)).trainer.strategy.solver
    assert type(solver) is cls and all(getattr(solver, k) == v for k, v in init.items())


UNKNOWN = [["--strategy.solver=NoSuch"], ["--strategy.solver", "NoSuch"], ["--strategy.solver.class_path=NoSuch"],
           ["--strategy.solver={class_path: NoSuch, init_args: {c: 1}}"], ["--strategy.solver=no_module.NoSuch"],
           ["--strategy", "{class_path: BucketMOOStrategy, init_args: {solver: NoSuch}}"], "config"]


@pytest.mark.parametrize("args", UNKNOWN, ids=["equals", "space", "class_path", "mapping", "dotted", "strategy", "config"])
def test_unknown_solver_fails_in_a_few_lines_that_list_the_solvers(tmp_path, capsys, args):
    if args == "config":
        config = tmp_path / "config.yaml"
        config.write_text("strategy:\n  class_path: lightning_moo.strategies.BucketMOOStrategy\n"
                          "  init_args:\n    solver: {class_path: NoSuch}\n")
        args = ["--config", str(config)]
    with pytest.raises(SystemExit) as exit_:
        MOOCLI(MultilingualLM, MultilingualDataModule, args=["fit", "--config", str(CONFIGS / "demo.yaml"), *args,
                                                             "--print_config"])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    error = captured.err[captured.err.index("lightning-moo: error:"):]
    assert "unknown solver 'NoSuch'" in error or "unknown solver 'no_module.NoSuch'" in error
    assert len(error.strip().splitlines()) == 2 and "usage:" not in captured.err and captured.out == ""
    assert ", ".join(solver_names()) in error and "class_path" in error.splitlines()[1]


def test_unknown_solver_from_the_installed_command(tmp_path):
    """The console script itself: exit status 2 and two lines, parsed before any training."""
    result = subprocess.run([sys.executable, "-m", "lightning_moo.cli", "fit", "--config", str(CONFIGS / "demo.yaml"),
                             "--strategy.solver=NoSuch", "--print_config"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if "[WARNING]" not in line]  # DeepSpeed's import notice
    assert lines == [
        f"lightning-moo: error: --strategy.solver: unknown solver 'NoSuch'; the solvers are: {', '.join(solver_names())}.",
        "Or give your own MOOSolver subclass: solver: {class_path: my_module.MySolver, init_args: {...}}",
    ]


def test_the_cli_in_a_test_process_leaves_no_launcher_mark(tmp_path, capsys):
    """Ranks started by the CLI's launcher inherit a mark that makes them leave failure reports to it;
    a CLI run inside this process must not pass that mark on to CLIs it starts later."""
    import os

    from lightning_moo import faults
    from lightning_moo.cli import main

    assert faults.LAUNCHER_PID not in os.environ
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "demo.yaml"), "--print_config"])
    assert faults.LAUNCHER_PID not in os.environ and not faults.is_launched_child()
