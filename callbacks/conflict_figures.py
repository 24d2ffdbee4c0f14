"""ConflictMonitor's images, sized to be read at TensorBoard's default image size (~800 px wide)
whether the model has 4 buckets or 160.

Rows are buckets in model order (embeddings at the top, head at the bottom), grouped by the
transformer block holding most of their elements: with many buckets a row is a few pixels high, so the
labels name the blocks (``L0`` … ``L31``, ``embeddings``, ``head``) and thin lines separate them;
each bucket gets its own label (``#index block kinds``) only when there is room for it. Values are
written into cells only where a cell is large enough to hold them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from torch import Tensor

from lightning_moo import metrics
from lightning_moo.buckets import BucketInfo
from lightning_moo.tensorboard import figure_pixels

DPI = 100
_KIND_SHORT = {"embeddings": "emb", "attention": "attn", "mlp": "mlp", "norms": "norm", "head": "head", "other": "other"}
_MAX_ROW_LABELS = 24  # one label per bucket up to this many rows
_LABEL_PX = 11  # least distance between two block labels


def _figure(width: float, height: float, left: float, bottom: float, right: float = 0.5, top: float = 0.45):
    """A Figure of ``width`` × ``height`` inches with one axes inset by the given margins (inches).

    Fixed margins sized from the labels rather than matplotlib's constrained layout, which measures
    every label's extent and cost more than drawing the figure; a bare Figure (no pyplot) keeps no
    global state and needs no display."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    ax = fig.add_axes((left / width, bottom / height, 1 - (left + right) / width, 1 - (bottom + top) / height))
    return fig, ax


def _colorbar(fig, ax, image) -> None:
    """A thin colour bar just right of ``ax``."""
    box = ax.get_position()
    cax = fig.add_axes((box.x1 + 0.12 / fig.get_figwidth(), box.y0, 0.15 / fig.get_figwidth(), box.height))
    fig.colorbar(image, cax=cax)


def _text_width(labels: Sequence[str], fontsize: float) -> float:
    """Inches a label column needs (DejaVu Sans averages ~0.6 em per character)."""
    return max((len(label) for label in labels), default=0) * fontsize * 0.6 / 72


def bucket_block(bucket: BucketInfo) -> str:
    """The transformer block (``L3``) or, outside blocks, the module kind holding most of the bucket's elements."""
    sizes: dict[str, int] = {}
    for p in bucket.params:
        layer = metrics.layer_index(p.name)
        block = f"L{layer}" if layer is not None else metrics.module_kind(p.name)
        sizes[block] = sizes.get(block, 0) + p.end - p.start
    return max(sizes, key=sizes.get)


def bucket_label(bucket: BucketInfo) -> str:
    """``#12 L3 attn+mlp``: reduction index, block, module kinds in the bucket."""
    kinds = []
    for p in bucket.params:
        kind = _KIND_SHORT[metrics.module_kind(p.name)]
        if kind not in kinds:
            kinds.append(kind)
    return f"#{bucket.index} {bucket_block(bucket)} {'+'.join(kinds)}"


def _row_labels(buckets: Sequence[BucketInfo]) -> list[str]:
    """The texts _label_rows may write (to size the left margin)."""
    if len(buckets) <= _MAX_ROW_LABELS:
        return [bucket_label(b) for b in buckets]
    return [bucket_block(b) for b in buckets]


def _label_rows(ax, fig, buckets: Sequence[BucketInfo]) -> None:
    """Y labels: per bucket when few, else per block (skipping labels that would overlap) with
    separators between blocks."""
    if len(buckets) <= _MAX_ROW_LABELS:
        ax.set_yticks(range(len(buckets)), [bucket_label(b) for b in buckets], fontsize=9)
        return
    starts = [r for r, b in enumerate(buckets) if r == 0 or bucket_block(b) != bucket_block(buckets[r - 1])]
    ends = starts[1:] + [len(buckets)]
    row_px = ax.get_position().height * fig.get_figheight() * DPI / len(buckets)
    ticks, last = [], -float("inf")
    for s, e in zip(starts, ends):
        middle = (s + e - 1) / 2
        if (middle - last) * row_px >= _LABEL_PX:
            ticks.append((middle, bucket_block(buckets[s])))
            last = middle
    ax.set_yticks([t for t, _ in ticks], [label for _, label in ticks], fontsize=8)
    for s in starts[1:]:
        ax.axhline(s - 0.5, color="0.35", linewidth=0.4)
    ax.set_ylabel(f"{len(buckets)} buckets, grouped by block")


def _heatmap(ax, values: np.ndarray, limit: float | None = None):
    """Diverging colours, zero white; the scale fits the data (gradients of large blocks are often
    nearly orthogonal, |cos| ≪ 1, and a fixed ±1 scale would show them all white)."""
    finite = values[np.isfinite(values)]
    lim = limit if limit is not None else max(0.05, float(np.abs(finite).max()) if finite.size else 0.0)
    return ax.imshow(values, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")


def _write_values(ax, fig, values: np.ndarray, fontsize: int = 8) -> None:
    """Each value in its cell, only when the cells are big enough to hold the text."""
    box = ax.get_position()
    width_px, height_px = box.width * fig.get_figwidth() * DPI, box.height * fig.get_figheight() * DPI
    rows, cols = values.shape
    if height_px / rows < 14 or width_px / cols < 38:
        return
    for r in range(rows):
        for c in range(cols):
            if np.isfinite(values[r, c]):
                ax.text(c, r, f"{values[r, c]:+.2f}", ha="center", va="center", fontsize=fontsize)


def _rows_height(rows: int) -> float:
    return min(1.6 + 0.28 * rows, 7.0)


def _rows_margin(buckets: Sequence[BucketInfo]) -> float:
    return _text_width(_row_labels(buckets), 9) + (0.75 if len(buckets) > _MAX_ROW_LABELS else 0.3)


def bucket_pair_figure(buckets: Sequence[BucketInfo], names: Sequence[str]):
    """Heatmap: one row per bucket (in the given order), one column per language pair, colour = cosine."""
    pairs = metrics.language_pairs(len(names))
    labels = [f"{names[i]}–{names[j]}" for i, j in pairs]
    values = np.array([metrics.pairwise_cosines(b.gram).tolist() for b in buckets], dtype=np.float64)
    rotate = len(pairs) > 4
    left = _rows_margin(buckets)
    bottom = 0.45 + (_text_width(labels, 10) * 0.72 if rotate else 0.2)
    fig, ax = _figure(min(left + 1.0 + 0.6 * len(pairs), 14.0), _rows_height(len(buckets)) + bottom - 0.6, left, bottom, right=1.0)
    image = _heatmap(ax, values)
    ax.set_xticks(range(len(pairs)), labels, rotation=45 if rotate else 0, ha="right" if rotate else "center")
    _label_rows(ax, fig, buckets)
    ax.set_xlabel("language pair")
    ax.set_title("gradient cosine per bucket and language pair (red = conflict)", fontsize=10)
    _colorbar(fig, ax, image)
    _write_values(ax, fig, values)
    return fig


def bucket_step_figure(buckets: Sequence[BucketInfo], history: Mapping[int, Mapping[int, float]]):
    """Heatmap: one row per bucket (in the given order), one column per logged step, colour = the
    bucket's mean pairwise cosine at that step; where conflict lives and whether it moves."""
    steps = sorted(history)
    values = np.array([[history[s].get(b.index, np.nan) for s in steps] for b in buckets], dtype=np.float64)
    left = _rows_margin(buckets)
    fig, ax = _figure(8.0, _rows_height(len(buckets)), left, 0.55, right=1.0)
    image = _heatmap(ax, values)
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int))
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
    _label_rows(ax, fig, buckets)
    ax.set_xlabel("step")
    ax.set_title("mean pairwise gradient cosine per bucket over steps", fontsize=10)
    _colorbar(fig, ax, image)
    return fig


def layer_profile_figure(buckets: Sequence[BucketInfo], names: Sequence[str]):
    """Per transformer block: mean and min pairwise cosine (top) and each language's solver weight
    (bottom, one named colour per language); the per-layer detail that scalars stop at."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 5.5), dpi=DPI)
    top = fig.add_axes((0.1, 0.56, 0.87, 0.37))
    bottom = fig.add_axes((0.1, 0.1, 0.87, 0.37), sharex=top)
    groups = metrics.group_pieces(buckets, "layer")
    layers = sorted((metrics.block_index(g), pieces) for g, pieces in groups.items() if metrics.block_index(g) is not None)
    top.set_title("gradient conflict and solver weights per transformer block", fontsize=10)
    if not layers:
        top.text(0.5, 0.5, "no transformer blocks in the parameter names", ha="center", transform=top.transAxes)
        return fig
    x = [i for i, _ in layers]
    grams = [metrics.sum_grams(p.gram for p in pieces) for _, pieces in layers]
    top.plot(x, [metrics.mean_cosine(g) for g in grams], marker=".", label="mean pairwise cosine")
    top.plot(x, [metrics.min_cosine(g) for g in grams], marker=".", label="min pairwise cosine")
    top.axhline(0, color="0.5", linewidth=0.6)
    top.set_ylabel("cosine")
    top.legend(fontsize=8, loc="best")
    weights = np.array([metrics.mean_weights(pieces).tolist() for _, pieces in layers])
    for t, name in enumerate(names):
        bottom.plot(x, weights[:, t], marker=".", label=name)
    bottom.axhline(1 / len(names), color="0.5", linewidth=0.6, linestyle="--")
    bottom.set_ylabel("solver weight")
    bottom.set_xlabel("transformer block")
    bottom.legend(fontsize=8, ncols=min(len(names), 8), loc="best")
    return fig


def language_cosine_figure(cos: Tensor, names: Sequence[str]):
    """The T×T cosine matrix of the whole model's gradients, values written in the cells."""
    T = len(names)
    left = _text_width(names, 10) + 0.35
    bottom = _text_width(names, 10) * 0.72 + 0.35
    side = min(0.55 * T + 0.6, 7.5)
    fig, ax = _figure(left + side + 1.1, bottom + side + 0.45, left, bottom, right=1.1)
    values = np.asarray(cos.tolist(), dtype=np.float64)
    image = _heatmap(ax, values, limit=1.0)
    ax.set_xticks(range(T), names, rotation=45, ha="right")
    ax.set_yticks(range(T), names)
    ax.set_title("whole-model gradient cosine", fontsize=10)
    _colorbar(fig, ax, image)
    _write_values(ax, fig, values)
    return fig


def in_model_order(buckets: list[BucketInfo], param_names: list[str]) -> list[BucketInfo]:
    """Buckets sorted by where their first parameter sits in ``param_names`` (``named_parameters()``
    order): DeepSpeed reduces in roughly backward order, the heatmap reads from the embeddings down.
    Buckets of unknown parameters go last, by reduction order."""
    position = {name: i for i, name in enumerate(param_names)}

    def key(bucket: BucketInfo) -> tuple[int, int]:
        known = [position[p.name] for p in bucket.params if p.name in position]
        return (min(known) if known else len(position), bucket.index)

    return sorted(buckets, key=key)


def draw_images(buckets: list[BucketInfo], names: list[str], param_names: list[str], history: Mapping[int, Mapping[int, float]]) -> dict:
    """ConflictMonitor's four figures of one step, by image name."""
    ordered = in_model_order(buckets, param_names)
    cos = metrics.cosine_matrix(metrics.sum_grams(b.gram for b in buckets))
    return {
        "bucket_pair_cosines": bucket_pair_figure(ordered, names),
        "bucket_step_cosines": bucket_step_figure(ordered, history),
        "layer_profile": layer_profile_figure(buckets, names),
        "language_cosines": language_cosine_figure(cos, names),
    }

