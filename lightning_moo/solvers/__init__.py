"""Gram-based multi-objective solvers: ``weights(gram: T×T) -> T weights``.

A solver maps the Gram matrix of the T task gradients of one bucket to the weights of the
bucket's update ``d = Σ_t w_t g_t``. Write your own by subclassing :class:`MOOSolver` and
implementing ``weights``; name it in YAML by ``class_path``.
"""

from .aligned_mtl import AlignedMTL
from .base import MOOSolver, check_gram
from .cagrad import CAGrad
from .imtl import IMTLG
from .linear import Mean, Sum
from .mgda import MGDA
from .nash_mtl import NashMTL
from .pcgrad import PCGrad
from .upgrad import DualProj, UPGrad

__all__ = [
    "MOOSolver",
    "check_gram",
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
]
