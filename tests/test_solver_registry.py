"""Solvers by short name: every built-in is registered, names are case-insensitive, an unknown
name fails in a few lines that list the solvers, and a user's class may register itself."""

from __future__ import annotations

import pytest
import torch

from lightning_moo.solvers import (
    BUILTIN, DWA, EMA, FAMO, GLS, IMTLG, MGDA, RLW, UW, AlignedMTL, CAGrad, ConFIG, DualProj, FairGrad, GradVac, Mean,
    MOOSolver, NashMTL, PCGrad, Sum, UPGrad, get_solver, register, resolve_solver, solver_class, solver_names,
)
from lightning_moo.solvers import registry

NAMES = ["mgda", "cagrad", "pcgrad", "imtlg", "upgrad", "dualproj", "alignedmtl", "nashmtl", "gradvac", "fairgrad",
         "config", "ema", "mean", "sum", "uw", "dwa", "rlw", "gls", "famo"]


@pytest.fixture
def clean_registry(monkeypatch):
    """Registrations made by a test vanish after it."""
    monkeypatch.setattr(registry, "_NAMES", dict(registry._NAMES))
    monkeypatch.setattr(registry, "_KEYS", dict(registry._KEYS))


def test_the_registry_lists_every_builtin_solver():
    assert solver_names()[: len(NAMES)] == NAMES
    assert [solver_class(name) for name in NAMES] == list(BUILTIN)
    assert set(BUILTIN) == {Mean, Sum, MGDA, CAGrad, PCGrad, IMTLG, UPGrad, DualProj, AlignedMTL, NashMTL, GradVac, FairGrad,
                            ConFIG, EMA, UW, DWA, RLW, GLS, FAMO}
    assert all(cls.name in NAMES for cls in BUILTIN)


@pytest.mark.parametrize(
    "name, cls",
    [("mgda", MGDA), ("MGDA", MGDA), ("Mgda", MGDA), ("CAGrad", CAGrad), ("cagrad", CAGrad), ("PCGRAD", PCGrad),
     ("imtlg", IMTLG), ("imtl-g", IMTLG), ("IMTL_G", IMTLG), ("upgrad", UPGrad), ("DualProj", DualProj),
     ("alignedmtl", AlignedMTL), ("aligned-mtl", AlignedMTL), ("AlignedMTL", AlignedMTL), ("nash-mtl", NashMTL),
     ("NashMTL", NashMTL), ("mean", Mean), ("Sum", Sum), ("lightning_moo.solvers.CAGrad", CAGrad)],
)
def test_names_resolve_case_insensitively(name, cls):
    assert solver_class(name) is cls
    assert type(resolve_solver(name)) is cls


def test_get_solver_passes_arguments():
    solver = get_solver("CAGrad", c=0.4, rescale=0)
    assert isinstance(solver, CAGrad) and solver.c == 0.4 and solver.rescale == 0


def test_resolve_solver_keeps_instances_and_defaults_to_mgda():
    solver = CAGrad(c=0.3)
    assert resolve_solver(solver) is solver
    assert type(resolve_solver(None)) is MGDA and resolve_solver(None).normalization == "none"
    with pytest.raises(TypeError, match="solver must be"):
        resolve_solver(3)


@pytest.mark.parametrize("name", ["NoSuch", "mgda2", "", "my_module.NoSuchSolver", "torch.nn.Linear"])
def test_unknown_name_fails_in_a_few_lines_listing_the_solvers(name):
    with pytest.raises(ValueError) as error:
        resolve_solver(name)
    message = str(error.value)
    assert message.startswith(f"unknown solver {name!r}")
    assert len(message.splitlines()) <= 3
    assert ", ".join(solver_names()) in message
    assert "class_path" in message


def test_a_users_solver_registers_itself(clean_registry):
    @register
    class Halves(MOOSolver):
        name = "halves"
        stateful = False

        def weights(self, gram):
            return torch.full((gram.shape[0],), 0.5, dtype=torch.float64)

    assert solver_names()[-1] == "halves"
    assert type(resolve_solver("HALVES")) is Halves and type(resolve_solver("Halves")) is Halves
    assert "halves" in str(pytest.raises(ValueError, resolve_solver, "nope").value)
    register(Halves)  # the same class again (a module reload) is fine
    assert solver_names().count("halves") == 1

    class Other(MOOSolver):
        def weights(self, gram):
            return torch.ones(gram.shape[0], dtype=torch.float64)

    with pytest.raises(ValueError, match="already registered"):
        register(Other, name="Halves")
    with pytest.raises(ValueError, match="already registered"):
        register(Other, name="mgda")
    with pytest.raises(TypeError, match="MOOSolver subclass"):
        register(int)


def test_a_subclass_of_a_builtin_does_not_take_its_name(clean_registry):
    class TunedCAGrad(CAGrad):
        pass

    register(TunedCAGrad)
    assert solver_class("cagrad") is CAGrad and solver_class("tunedcagrad") is TunedCAGrad


def test_an_unregistered_subclass_is_not_listed():
    class Unlisted(MOOSolver):
        def weights(self, gram):
            return torch.ones(gram.shape[0], dtype=torch.float64)

    assert "unlisted" not in solver_names()
    with pytest.raises(ValueError, match="unknown solver"):
        solver_class("Unlisted")


def test_declarations_are_conservative_by_default():
    class Plain(MOOSolver):
        def weights(self, gram):
            return torch.ones(gram.shape[0], dtype=torch.float64)

    assert Plain().declarations() == {"conflict_free": False, "scale_invariant": False,
                                      "permutation_equivariant": False, "stateful": True}


def test_docs_list_every_registered_solver():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "solvers.md").read_text()
    missing = [name for name in solver_names() if f"`{name}`" not in text]
    assert not missing, f"docs/solvers.md does not list {missing}"
