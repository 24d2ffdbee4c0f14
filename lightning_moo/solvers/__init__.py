"""Multi-objective solvers: ``weights(gram: T×T) -> T weights``, and loss-based weightings.

A solver maps the Gram matrix of the T task gradients of one bucket to the weights of the
bucket's update ``d = Σ_t w_t g_t``. A loss-based weighting (:mod:`.loss_based`) maps the T
tasks' losses of a step to the weights of ``Σ_t w_t L_t`` instead (docs/solvers.md lists all).

**By name.** Every built-in solver is registered under a short, case-insensitive name
(:func:`solver_names`: ``mgda``, ``cagrad``, ``pcgrad``, ``imtlg``, ``upgrad``, ``dualproj``,
``alignedmtl``, ``nashmtl``, ``gradvac``, ``fairgrad``, ``config``, ``ema``, ``mean``, ``sum``, and
the weightings ``uw``, ``dwa``, ``rlw``, ``gls``, ``famo``; ``-`` and ``_`` are ignored and class
names resolve too). :func:`get_solver` builds one (``get_solver("cagrad", c=0.4)``);
:func:`resolve_solver` turns what a user gave (an instance, a name, ``None`` for ``MGDA()``) into a
solver, and the strategies call it, so an unknown name fails with a short ``ValueError`` that lists
the solvers. On the command line: ``--strategy.solver=cagrad --strategy.solver.c=0.4``.

**Declarations.** Each class declares what it guarantees as class attributes
(:data:`~lightning_moo.solvers.base.DECLARATIONS`): ``conflict_free`` (``<g_t, d> ≥ 0`` for all t),
``scale_invariant`` (``weights(c·G) = weights(G)`` for ``c > 0``), ``permutation_equivariant``
and ``stateful`` (keeps per-bucket state between steps). The base class claims nothing; an
instance whose arguments change a guarantee says so (``CAGrad(c=1.0).conflict_free``), see
:meth:`MOOSolver.declarations`. The property tests check every declared guarantee.

**Your own.** Subclass :class:`MOOSolver`, implement ``weights`` and set the declarations that
hold; name it in YAML by ``class_path`` (``solver: {class_path: my_module.MySolver}``), or give it
a short name with :func:`register`.
"""

from .aligned_mtl import AlignedMTL
from .base import DECLARATIONS, MOOSolver, check_gram
from .cagrad import CAGrad
from .config_method import ConFIG
from .ema import EMA
from .fairgrad import FairGrad
from .gradvac import GradVac
from .imtl import IMTLG
from .linear import Mean, Sum
from .loss_based import DWA, FAMO, GLS, RLW, UW, LossWeighting
from .mgda import MGDA
from .nash_mtl import NashMTL
from .pcgrad import PCGrad
from .registry import (
    BUILTIN, get_solver, register, resolve_solver, solver_class, solver_class_path, solver_names, unknown_solver_message,
)
from .upgrad import DualProj, UPGrad

__all__ = [
    "MOOSolver",
    "check_gram",
    "DECLARATIONS",
    "BUILTIN",
    "register",
    "solver_names",
    "solver_class",
    "solver_class_path",
    "get_solver",
    "resolve_solver",
    "unknown_solver_message",
    "Mean",
    "Sum",
    "MGDA",
    "CAGrad",
    "PCGrad",
    "IMTLG",
    "UPGrad",
    "DualProj",
    "AlignedMTL",
    "NashMTL",
    "FairGrad",
    "ConFIG",
    "GradVac",
    "EMA",
    "LossWeighting",
    "UW",
    "DWA",
    "RLW",
    "GLS",
    "FAMO",
]
