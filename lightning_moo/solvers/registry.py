"""Solvers by short name: ``get_solver("cagrad", c=0.4)``, ``resolve_solver("MGDA")``.

Every built-in solver is registered here, explicitly, under its ``name`` class attribute; the
class name resolves too. Names are case-insensitive and ignore ``-`` and ``_``: ``"nash-mtl"``,
``"NashMTL"`` and ``"nashmtl"`` are the same solver.

A solver of your own needs no registration: any :class:`MOOSolver` subclass works by
``class_path`` in YAML (``solver: {class_path: my_module.MySolver, init_args: {...}}``) or as an
instance in Python. Register it to give it a short name too::

    @register
    class MySolver(MOOSolver):
        name = "mine"
        ...

(the CLI knows the name once the module that defines the class has been imported).
"""

from __future__ import annotations

import importlib
from typing import Any, TypeVar

from .aligned_mtl import AlignedMTL
from .base import MOOSolver
from .cagrad import CAGrad
from .config_method import ConFIG
from .ema import EMA
from .fairgrad import FairGrad
from .gradvac import GradVac
from .imtl import IMTLG
from .linear import Mean, Sum
from .loss_based import DWA, FAMO, GLS, RLW, UW
from .mgda import MGDA
from .nash_mtl import NashMTL
from .pcgrad import PCGrad
from .upgrad import DualProj, UPGrad

S = TypeVar("S", bound=type[MOOSolver])

#: The built-in solvers, in the order :func:`solver_names` lists them.
BUILTIN: tuple[type[MOOSolver], ...] = (
    MGDA, CAGrad, PCGrad, IMTLG, UPGrad, DualProj, AlignedMTL, NashMTL, GradVac, FairGrad, ConFIG, EMA, Mean, Sum,
    UW, DWA, RLW, GLS, FAMO,  # loss-based weightings
)

_NAMES: dict[str, type[MOOSolver]] = {}  # registered name -> class, in registration order
_KEYS: dict[str, type[MOOSolver]] = {}  # normalised name or class name -> class


def _key(name: str) -> str:
    return name.casefold().replace("-", "").replace("_", "").replace(" ", "")


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register(cls: S | None = None, *, name: str | None = None) -> Any:
    """Register a :class:`MOOSolver` subclass under ``name`` (default: its ``name`` class
    attribute, else its class name in lower case); its class name resolves too.

    Use as ``register(MySolver)``, ``@register`` or ``@register(name="mine")``. Raises
    ``ValueError`` when the name is taken by another class (re-registering the same class, e.g.
    after a module reload, replaces it).
    """

    def add(solver_cls: S) -> S:
        if not (isinstance(solver_cls, type) and issubclass(solver_cls, MOOSolver)):
            raise TypeError(f"register expects a MOOSolver subclass, got {solver_cls!r}")
        short = name or solver_cls.__dict__.get("name") or solver_cls.__name__.lower()
        keys = {_key(short), _key(solver_cls.__name__)}
        for key in keys:
            taken = _KEYS.get(key)
            if taken is not None and _qualified(taken) != _qualified(solver_cls):
                raise ValueError(f"solver name {short!r} is already registered for {_qualified(taken)}")
        for registered, other in list(_NAMES.items()):  # a reloaded class replaces its old entry
            if _qualified(other) == _qualified(solver_cls):
                del _NAMES[registered]
        _NAMES[short.casefold()] = solver_cls
        for key in keys:
            _KEYS[key] = solver_cls
        return solver_cls

    return add if cls is None else add(cls)


for _builtin in BUILTIN:
    register(_builtin)


def solver_names() -> list[str]:
    """The registered short names: the built-ins (``mgda``, ``cagrad``, …), then the user's."""
    return list(_NAMES)


def solver_class(name: str) -> type[MOOSolver]:
    """The class registered under ``name`` (case-insensitive; class names too) or, for a dotted
    ``module.Class`` path, that class. Raises ``ValueError`` listing the solvers otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"a solver name must be a string, got {type(name).__name__}")
    cls = _KEYS.get(_key(name))
    if cls is not None:
        return cls
    if "." in name.strip(".") and " " not in name:
        module, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as error:
            raise ValueError(unknown_solver_message(name, f"cannot import it: {error}")) from None
        if isinstance(cls, type) and issubclass(cls, MOOSolver):
            return cls
        raise ValueError(unknown_solver_message(name, "it is not a MOOSolver subclass"))
    raise ValueError(unknown_solver_message(name))


def solver_class_path(name: str) -> str:
    """What to hand jsonargparse for a solver given by ``name``: a registered name becomes its
    class's import path; a dotted path that imports, or the class name of an imported (unregistered)
    MOOSolver subclass, which jsonargparse resolves itself, is returned as is. Raises ``ValueError``
    listing the solvers for anything else, before jsonargparse can fail with a usage dump."""
    if "." in name:
        module, _, attr = name.rpartition(".")
        try:
            getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as error:
            raise ValueError(unknown_solver_message(name, f"cannot import it: {error}")) from None
        return name  # jsonargparse checks that it is a MOOSolver (or a callable returning one)
    cls = _KEYS.get(_key(name))
    if cls is not None:  # a built-in by the package's public path, as jsonargparse prints it
        return f"{__package__}.{cls.__name__}" if cls in BUILTIN else _qualified(cls)
    if any(sub.__name__ == name for sub in _subclasses(MOOSolver)):
        return name
    raise ValueError(unknown_solver_message(name))


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def get_solver(name: str, **kwargs: Any) -> MOOSolver:
    """A new solver by name: ``get_solver("cagrad", c=0.4)``. Raises ``ValueError`` listing the
    solvers for an unknown name."""
    return solver_class(name)(**kwargs)


def resolve_solver(spec: MOOSolver | str | None) -> MOOSolver:
    """A solver from what a user gave: an instance (returned as is), a registered name or dotted
    class path or a MOOSolver subclass (a new instance with default arguments), or ``None`` (the
    default, ``MGDA()``). Raises ``ValueError`` listing the solvers for an unknown name."""
    if spec is None:
        return MGDA()
    if isinstance(spec, MOOSolver):
        return spec
    if isinstance(spec, str):
        return get_solver(spec)
    if isinstance(spec, type) and issubclass(spec, MOOSolver):
        return spec()
    raise TypeError(
        f"solver must be a MOOSolver, a solver name or None, got {type(spec).__name__}: {spec!r}. "
        f"The solvers are: {', '.join(solver_names())}."
    )


def unknown_solver_message(name: str, reason: str | None = None) -> str:
    """``unknown solver 'x'; the solvers are: mgda, …`` and how to name a class of your own."""
    why = f" ({reason})" if reason else ""
    return (
        f"unknown solver {name!r}{why}; the solvers are: {', '.join(solver_names())}.\n"
        "Or give your own MOOSolver subclass: solver: {class_path: my_module.MySolver, init_args: {...}}"
    )
