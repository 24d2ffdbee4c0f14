"""What ConflictMonitor writes for one step, as plain data: scalars and histograms by TensorBoard run.

TensorBoard gives each run its own colour and names it in every legend and tooltip, but draws the tags
of one run in one colour. So a value that exists once per language is written under one tag into that
language's run (``language/<name>``), and one per language pair into the pair's run (``pair/<a>-<b>``):
the chart ``by_language/solver_weight`` then shows one line per language, coloured and named. The main
run (``""``) holds what has no language in it.

Tags per logged step stay bounded as the model grows: per-bucket scalars are written only up to
``max_bucket_scalars`` buckets and per-layer scalars up to ``max_layer_scalars`` layers; above that the
buckets (layers) become histograms over buckets (layers), the layers are summarised by
``layer_groups`` contiguous groups, and the per-bucket detail goes into images (see the monitor).
:func:`scalar_bounds` is the resulting bound.

The applied direction d is compared with **shadow** directions (:class:`Shadow`): what other solvers
would have applied on the same Grams, per bucket or on the whole model. A solver maps Grams to
weights, so replaying one costs T×T work per bucket and no gradient.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import torch
from torch import Tensor

from lightning_moo import metrics
from lightning_moo.buckets import BucketInfo
from lightning_moo.solvers import MGDA, MOOSolver, get_solver

MAIN = ""  # the TensorBoard logger's own run
GLOBAL = "conflict/global"

# Language-free scalars of every group (main run), and the per-language ones (language runs).
GROUP_SCALARS = ("cosine_mean", "cosine_min", "conflict_ratio")
LANGUAGE_SCALARS = ("grad_norm", "weight")

#: The solvers replayed per bucket by default, next to the applied direction.
SHADOW_SOLVERS = ("mean", "mgda", "cagrad")


def language_run(name: str) -> str:
    return f"language/{name}"


def pair_run(a: str, b: str) -> str:
    return f"pair/{a}-{b}"


@dataclass(frozen=True)
class Limits:
    """Where per-bucket and per-layer scalars give way to histograms and layer groups."""

    max_bucket_scalars: int = 16
    max_layer_scalars: int = 8
    layer_groups: int = 4

    def __post_init__(self) -> None:
        if min(self.max_bucket_scalars, self.max_layer_scalars) < 0 or self.layer_groups < 1:
            raise ValueError(
                f"max_bucket_scalars and max_layer_scalars must be ≥ 0 and layer_groups ≥ 1, got {self.max_bucket_scalars}, "
                f"{self.max_layer_scalars} and {self.layer_groups}"
            )


@dataclass
class Records:
    """One step's values: ``scalars[run][tag]`` and ``histograms[run][tag]`` (values over buckets or layers)."""

    scalars: dict[str, dict[str, float]] = field(default_factory=dict)
    histograms: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def scalar(self, run: str, tag: str, value: float) -> None:
        self.scalars.setdefault(run, {})[tag] = float(value)

    def histogram(self, run: str, tag: str, values: Sequence[float]) -> None:
        self.histograms.setdefault(run, {})[tag] = np.asarray(values, dtype=np.float64)

    @property
    def scalar_series(self) -> int:
        """(run, tag) pairs: the series TensorBoard stores and loads, one point each per logged step."""
        return sum(len(tags) for tags in self.scalars.values())

    @property
    def scalar_tags(self) -> set[str]:
        """Distinct tags: the charts of the Scalars page."""
        return {tag for tags in self.scalars.values() for tag in tags}


@dataclass(frozen=True)
class Shadow:
    """A direction the applied one is compared with: what ``solver`` would have applied on this step's
    Grams, solving each bucket's G_b (``level="bucket"``) or once the whole model's Σ_b G_b
    (``level="global"``: one weight vector for every parameter). Its scalars are tagged ``tag``."""

    name: str
    solver: MOOSolver
    level: Literal["bucket", "global"]

    @property
    def tag(self) -> str:
        return f"{self.name}_{self.level}"


def replayable(solver: MOOSolver) -> Optional[str]:
    """Why ``solver`` cannot be replayed on a step's Grams off the training thread, or None if it can.

    A stateful solver's weights depend on its history of solves (GradVac's and EMA's moving
    averages, Nash-MTL's warm start): a fresh instance would answer like a first step, and the
    training instance must not be touched. A loss-based weighting does not solve Grams at all."""
    if not solver.uses_gram:
        return f"{type(solver).__name__} weighs losses, not gradients"
    if solver.stateful:
        return f"{type(solver).__name__} is stateful: its weights depend on earlier steps a replay has not seen"
    return None


def default_shadows(names: Sequence[str] = SHADOW_SOLVERS, running: Optional[MOOSolver] = None) -> tuple[Shadow, ...]:
    """Fresh shadows: the registry solvers ``names`` (default arguments) per bucket, MGDA on the whole
    model (the min-norm point of conv{g_t}, the direction of Pareto stationarity), and — given the
    running solver — a private copy of it on the whole model (``solver_global``), unless
    :func:`replayable` says no. The instances are the caller's alone: solving sets per-call context
    on a solver, so the training thread's instance is never used."""
    out = []
    for name in names:
        solver = get_solver(name)
        if (reason := replayable(solver)) is not None or solver.needs_losses:
            raise ValueError(f"shadow solver {name!r} cannot be replayed on the Grams alone: {reason or 'it reads the losses'}")
        out.append(Shadow(name, solver, "bucket"))
    out.append(Shadow("mgda", MGDA(), "global"))
    if running is not None and replayable(running) is None:
        out.append(Shadow("solver", copy.deepcopy(running), "global"))
    return tuple(out)


def scalar_bounds(num_languages: int, limits: Limits = Limits(), num_shadows: int = len(SHADOW_SOLVERS) + 2) -> tuple[int, int]:
    """(tags, series): the most distinct scalar tags and (run, tag) series of one logged step, whatever
    the number of buckets and layers.

    Groups: at most 7 module kinds (six and ``mixed``), ``layer_none`` and ``layer_mixed``, then either
    one group per layer (up to ``max_layer_scalars``) or ``layer_groups``, and up to
    ``max_bucket_scalars`` buckets. Each group has 3 main-run scalars and 2 per language, under 5 tags;
    a bucket adds its gap. The whole model adds the two gaps and ‖d‖, a progress per language and a
    cosine per language pair, and each of ``num_shadows`` shadow directions (default: the
    monitor's) its norm, its cosine with d and a progress per language."""
    T = num_languages
    groups = 7 + 2 + max(limits.max_layer_scalars, limits.layer_groups) + 1  # + the whole model
    per_group_tags, per_group_series = len(GROUP_SCALARS) + len(LANGUAGE_SCALARS), len(GROUP_SCALARS) + len(LANGUAGE_SCALARS) * T
    tags = groups * per_group_tags + 3 + 1 + 1 + 3 * num_shadows + limits.max_bucket_scalars * (per_group_tags + 1)
    series = (groups * per_group_series + 3 + T + T * (T - 1) // 2 + num_shadows * (2 + T)
              + limits.max_bucket_scalars * (per_group_series + 1))
    return tags, series


def _group(records: Records, prefix: str, pieces: list[metrics.Piece], names: list[str]) -> None:
    gram = metrics.sum_grams(p.gram for p in pieces)
    records.scalar(MAIN, f"{prefix}/cosine_mean", metrics.mean_cosine(gram))
    records.scalar(MAIN, f"{prefix}/cosine_min", metrics.min_cosine(gram))
    records.scalar(MAIN, f"{prefix}/conflict_ratio", metrics.conflict_ratio(gram))
    # The whole model's per-language series open the Scalars and Time Series pages (their groups sort
    # alphabetically: by_language < by_pair < conflict); a group's stay with the group.
    norm_tag, weight_tag = (f"{prefix}/grad_norm", f"{prefix}/weight") if prefix != GLOBAL else ("by_language/grad_norm", "by_language/solver_weight")
    for name, norm, weight in zip(names, metrics.grad_norms(gram).tolist(), metrics.mean_weights(pieces).tolist()):
        records.scalar(language_run(name), norm_tag, norm)
        records.scalar(language_run(name), weight_tag, weight)


def _histograms(records: Records, prefix: str, groups: list[list[metrics.Piece]], names: list[str]) -> None:
    """Per-group values as histograms over the groups (buckets or layers): the shape of the distribution
    stays visible, the tag count does not grow with the model."""
    grams = [metrics.sum_grams(p.gram for p in pieces) for pieces in groups]
    records.histogram(MAIN, f"{prefix}/cosine_mean", [metrics.mean_cosine(g) for g in grams])
    records.histogram(MAIN, f"{prefix}/cosine_min", [metrics.min_cosine(g) for g in grams])
    weights = np.array([metrics.mean_weights(pieces).tolist() for pieces in groups])
    for t, name in enumerate(names):
        records.histogram(language_run(name), f"{prefix}/weight", weights[:, t])


def layer_group_names(layers: Sequence[int], num_groups: int) -> dict[int, str]:
    """Contiguous groups of transformer blocks, ``layers_<first>-<last>``, as even as possible."""
    ordered = sorted(set(layers))
    bounds = [len(ordered) * g // num_groups for g in range(num_groups + 1)]
    names = {}
    for g in range(num_groups):
        members = ordered[bounds[g] : bounds[g + 1]]
        for layer in members:
            names[layer] = f"layers_{members[0]}-{members[-1]}"
    return names


def _directions(records: Records, buckets: list[BucketInfo], total: Tensor, names: list[str],
                shadows: Sequence[Shadow], losses: Optional[Tensor]) -> None:
    """The applied direction's norm and progress, and each shadow's norm, cosine with it and progress.
    A shadow whose solver reads the losses is left out when the step's losses are not at hand."""
    step = buckets[0].step
    solved, weights = [], []
    for shadow in shadows:
        if shadow.solver.needs_losses and losses is None:
            continue
        given = losses if shadow.solver.needs_losses else None
        if shadow.level == "bucket":
            w = torch.stack([shadow.solver(b.gram, bucket=b.index, step=step, losses=given) for b in buckets])
        else:  # as the strategies solve the single bucket of mode="global_two_pass"
            w = shadow.solver(total, bucket="global", step=step, losses=given)
        solved.append(shadow)
        weights.append(w)
    applied = torch.stack([b.weights for b in buckets])
    stats = metrics.compare_directions([b.gram for b in buckets], [applied, *weights])
    records.scalar(MAIN, f"{GLOBAL}/direction_norm", stats.norms[0])
    for name, value in zip(names, stats.progress[0].tolist()):
        records.scalar(language_run(name), "by_language/progress", value)
    for k, shadow in enumerate(solved, start=1):
        records.scalar(MAIN, f"{GLOBAL}/direction_norm_{shadow.tag}", stats.norms[k])
        records.scalar(MAIN, f"{GLOBAL}/direction_cos_{shadow.tag}", stats.cosines[0, k])
        for name, value in zip(names, stats.progress[k].tolist()):
            records.scalar(language_run(name), f"{GLOBAL}/progress_{shadow.tag}", value)


def conflict_records(buckets: list[BucketInfo], names: list[str], limits: Limits = Limits(),
                     shadows: Optional[Sequence[Shadow]] = None, losses: Optional[Tensor] = None) -> Records:
    """Everything ConflictMonitor logs as scalars and histograms for one step (``buckets`` of that step).

    ``shadows``: the directions d is compared with (default: fresh :func:`default_shadows` without the
    running solver's); ``losses``: each language's loss this step, for a shadow solver that reads
    them."""
    records = Records()
    grams = [b.gram for b in buckets]
    total = metrics.sum_grams(grams)
    whole = [metrics.Piece.of_bucket(b) for b in buckets]
    _group(records, GLOBAL, whole, names)
    for (i, j), cosine in zip(metrics.language_pairs(len(names)), metrics.pairwise_cosines(total).tolist()):
        records.scalar(pair_run(names[i], names[j]), "by_pair/cosine", cosine)
    gaps = [metrics.stationarity_gap(g) for g in grams]  # one min-norm QP per bucket, used twice below
    records.scalar(MAIN, "conflict/global/gap_global", metrics.stationarity_gap(total))
    records.scalar(MAIN, "conflict/global/gap_bucket_sum", sum(gaps))
    _directions(records, buckets, total, names, default_shadows() if shadows is None else shadows, losses)

    for kind, pieces in metrics.group_pieces(buckets, "kind").items():
        _group(records, f"conflict/{kind}", pieces, names)

    by_layer = metrics.group_pieces(buckets, "layer")
    blocks = {metrics.block_index(group): pieces for group, pieces in by_layer.items() if metrics.block_index(group) is not None}
    for group, pieces in by_layer.items():
        if metrics.block_index(group) is None or len(blocks) <= limits.max_layer_scalars:
            _group(records, f"conflict/{group}", pieces, names)
    if len(blocks) > limits.max_layer_scalars:
        grouped: dict[str, list[metrics.Piece]] = {}
        group_of = layer_group_names(list(blocks), limits.layer_groups)
        for block, pieces in sorted(blocks.items()):
            grouped.setdefault(group_of[block], []).extend(pieces)
        for group, pieces in grouped.items():
            _group(records, f"conflict/{group}", pieces, names)
        _histograms(records, "conflict/layers", list(blocks.values()), names)

    if len(buckets) <= limits.max_bucket_scalars:
        for b, gap in zip(buckets, gaps):
            _group(records, f"conflict/bucket_{b.index}", [metrics.Piece.of_bucket(b)], names)
            records.scalar(MAIN, f"conflict/bucket_{b.index}/gap", gap)
    else:
        _histograms(records, "conflict/buckets", [[metrics.Piece.of_bucket(b)] for b in buckets], names)
        records.histogram(MAIN, "conflict/buckets/gap", gaps)
    return records
