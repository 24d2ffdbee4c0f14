"""BucketMOOStrategy from YAML (as LightningCLI builds it) and its argument checks; no processes."""

import pytest
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import Strategy

from lightning_moo.exchange import AllGatherExchange, ShardedExchange
from lightning_moo.solvers import MGDA, CAGrad
from lightning_moo.strategies import BucketMOOStrategy

CONFIG = """
strategy:
  class_path: lightning_moo.strategies.BucketMOOStrategy
  init_args:
    solver:
      class_path: lightning_moo.solvers.CAGrad
      init_args: {c: 0.4}
    exchange: allgather
    stage: 1
    reduce_bucket_size: 1000
"""


@pytest.mark.timeout(60)
def test_strategy_and_solver_from_yaml():
    parser = ArgumentParser()
    parser.add_subclass_arguments(Strategy, "strategy")
    strategy = parser.instantiate(parser.parse_object(yaml.safe_load(CONFIG))).strategy
    assert isinstance(strategy, BucketMOOStrategy)
    assert isinstance(strategy.solver, CAGrad) and strategy.solver.c == 0.4
    assert isinstance(strategy.exchange, AllGatherExchange)
    assert strategy.config["zero_optimization"]["stage"] == 1
    assert strategy.config["zero_optimization"]["reduce_bucket_size"] == 1000


@pytest.mark.timeout(60)
def test_defaults_and_argument_errors():
    strategy = BucketMOOStrategy()
    assert isinstance(strategy.solver, MGDA) and isinstance(strategy.exchange, ShardedExchange) and strategy.mode == "bucket"
    with pytest.raises(ValueError, match="unknown exchange 'ring'"):
        BucketMOOStrategy(exchange="ring")
    with pytest.raises(ValueError, match="mode must be"):
        BucketMOOStrategy(mode="layer")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["demo_zero3.yaml", "llama3_70b_zero3_mgda.yaml"])
def test_shipped_zero3_configs_pass_the_strategy_checks(name):
    """The shipped ZeRO-3 configs reach DeepSpeed with stage 3, and nothing in them is refused."""
    from pathlib import Path

    from lightning_moo.layout import LanguageLayout

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / name).read_text())
    parser = ArgumentParser()
    parser.add_subclass_arguments(Strategy, "strategy")
    strategy = parser.instantiate(parser.parse_object({"strategy": config["strategy"]})).strategy
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] > 0 and zero["contiguous_gradients"]
    languages = config["data"]["train_languages"]
    strategy.layout = LanguageLayout.build(languages, config["trainer"]["devices"])
    strategy._check_config()  # raises MisconfigurationException for anything the hook cannot serve
