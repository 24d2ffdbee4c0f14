"""The CLI builds what the command line says: solver swaps, a user's own solver, languages from the data."""

from pathlib import Path

import pytest

from lightning_moo.cli import MOOCLI
from lightning_moo.data import MultilingualDataModule
from lightning_moo.module import MultilingualLM
from lightning_moo.solvers import CAGrad, MGDA, MOOSolver
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


@pytest.mark.parametrize("name", ["demo.yaml", "sib200_smollm2.yaml", "llama3_8b_zero2_mgda.yaml", "qwen3_8b_zero2_cagrad.yaml"])
def test_shipped_configs_parse(name, capsys):
    # --print_config parses and validates the whole file, instantiating nothing (no weights, no data).
    with pytest.raises(SystemExit) as exit_:
        MOOCLI(MultilingualLM, MultilingualDataModule, args=["fit", "--config", str(CONFIGS / name), "--print_config"])
    assert exit_.value.code == 0
    assert "train_languages" in capsys.readouterr().out
