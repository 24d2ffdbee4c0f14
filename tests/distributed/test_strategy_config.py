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
