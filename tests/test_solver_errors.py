"""Bad input fails early with a message that names the problem; user solvers plug in from YAML."""

from __future__ import annotations

import pytest
import torch
from jsonargparse import ArgumentParser

from lightning_moo.solvers import MGDA, CAGrad, MOOSolver, PCGrad, UPGrad


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gram_raises_and_names_the_task(bad):
    G = torch.eye(3, dtype=torch.float64)
    G[1, 1] = bad
    with pytest.raises(ValueError, match=r"non-finite.*task\(s\) \[1\]"):
        MGDA()(G)


@pytest.mark.parametrize("shape", [(3,), (2, 3), (0, 0), (2, 2, 2)])
def test_non_square_gram_raises(shape):
    with pytest.raises(ValueError, match="square"):
        MGDA()(torch.ones(shape))


def test_negative_diagonal_raises():
    with pytest.raises(ValueError, match="negative diagonal"):
        MGDA()(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))


@pytest.mark.parametrize(
    "make, message",
    [(lambda: MGDA("l1"), "normalization"), (lambda: CAGrad(c=-1), "c must"), (lambda: CAGrad(rescale=3), "rescale"),
     (lambda: PCGrad(reduction="max"), "reduction")],
)
def test_bad_constructor_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_preference_vector():
    with pytest.raises(ValueError, match="pref must be 2"):
        UPGrad(pref=[1.0, 1.0, 1.0])(torch.eye(2))


def test_a_solver_returning_nan_is_caught():
    class Broken(MOOSolver):
        def weights(self, gram):
            return torch.full((gram.shape[0],), float("nan"), dtype=torch.float64)

    with pytest.raises(RuntimeError, match="Broken produced non-finite weights"):
        Broken()(torch.eye(2))


class ScaledMean(MOOSolver):
    """A user's solver: the mean times a factor, one method."""

    def __init__(self, factor: float = 1.0) -> None:
        super().__init__()
        self.factor = factor

    def weights(self, gram):
        return torch.full((gram.shape[0],), self.factor / gram.shape[0], dtype=torch.float64)


def test_user_solver_and_builtin_solvers_from_yaml_class_path():
    parser = ArgumentParser()
    parser.add_argument("--solver", type=MOOSolver)
    cfg = parser.parse_string(f"solver:\n  class_path: {__name__}.ScaledMean\n  init_args:\n    factor: 3.0\n")
    solver = parser.instantiate(cfg).solver
    assert isinstance(solver, ScaledMean)
    assert torch.allclose(solver(torch.eye(3)), torch.ones(3))
    cfg = parser.parse_args(["--solver=CAGrad", "--solver.c=0.4"])
    assert parser.instantiate(cfg).solver.c == 0.4
