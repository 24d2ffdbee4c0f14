"""ConflictMonitor: gradient-conflict metrics in TensorBoard from the Gram matrices bucket-level MOO already has.

BucketMOOStrategy all-reduces one T×T Gram matrix per ZeRO bucket to run its solver, so every rank
ends each step holding ``trainer.strategy.buckets``. Everything logged here is a function of those
Grams and the solver's weights: no gradient is copied and nothing is communicated. Rank zero logs;
the other ranks return at once.
"""

from __future__ import annotations

import re
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_moo import metrics
from lightning_moo.buckets import BucketInfo

_KINDS = "|".join(re.escape(k) for k in (*metrics.MODULE_KINDS, "mixed"))
# Per-group scalars, each a chart of one row of the custom-scalars dashboard.
_GROUP_CHARTS = {
    "mean pairwise cosine": "cosine_mean",
    "min pairwise cosine": "cosine_min",
    "conflict ratio (share of pairs with cos < 0)": "conflict_ratio",
}


class ConflictMonitor(pl.Callback):
    """Log gradient conflict between languages, per bucket, layer, module kind and for the whole model.

    Every ``log_every_n_steps`` optimizer steps (step s is logged when ``s % log_every_n_steps == 0``):

    * ``conflict/global/...`` from the whole model's Gram Σ_b G_b: ``cosine_mean``, ``cosine_min``,
      ``conflict_ratio``, ``cosine/<a>_<b>`` per language pair, ``grad_norm/<lang>``,
      ``weight/<lang>`` (solver weights averaged over buckets by element count), ``gap_global``
      (‖min-norm point‖² of Σ_b G_b) and ``gap_bucket_sum`` (Σ_b ‖min-norm point of G_b‖²);
    * the same cosine, ratio, norm and weight scalars under ``conflict/<kind>/`` (embeddings,
      attention, mlp, norms, head, other; split exactly by parameter, ``mixed`` only for a
      global_two_pass bucket spanning several kinds),
      ``conflict/layer_<i>/`` and ``conflict/bucket_<i>/`` (i = order of reduction; buckets also get
      ``gap``).

    Every ``image_every_n_steps`` steps two images: ``conflict/images/bucket_pair_cosines`` (buckets in
    model order × language pairs) and ``conflict/images/language_cosines`` (whole model).

    Needs ``BucketMOOStrategy`` and a ``TensorBoardLogger``. Language names come from the strategy's
    ``languages`` list, else ``lang<t>``. With gradient accumulation under ZeRO-2 the Grams are those
    of the last micro-batch (ZeRO-2 reduces every micro-batch); under ZeRO-1 those of the step.
    """

    def __init__(self, log_every_n_steps: int = 50, image_every_n_steps: int = 500) -> None:
        super().__init__()
        if log_every_n_steps < 1 or image_every_n_steps < 1:
            raise ValueError(
                f"log_every_n_steps and image_every_n_steps must be ≥ 1, got {log_every_n_steps} and {image_every_n_steps}"
            )
        self.log_every_n_steps = log_every_n_steps
        self.image_every_n_steps = image_every_n_steps
        self._logger: Optional[TensorBoardLogger] = None
        self._param_names: list[str] = []
        self._last_step = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Checked on every rank, so that all ranks fail together instead of one hanging in a collective.
        if not hasattr(trainer.strategy, "buckets"):
            raise MisconfigurationException(
                f"ConflictMonitor reads the per-bucket Gram matrices of BucketMOOStrategy or BucketMOODDPStrategy, "
                f"but the trainer's strategy is {type(trainer.strategy).__name__}. Use one of those (with solver=Mean "
                "they train exactly like stock DeepSpeed / DDP)."
            )
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            found = [type(lg).__name__ for lg in trainer.loggers] or "no logger"
            raise MisconfigurationException(
                f"ConflictMonitor writes TensorBoard scalars, images and a custom-scalars layout, but the trainer has "
                f"{found}. Add logger=lightning.pytorch.loggers.TensorBoardLogger(save_dir=...)."
            )
        self._logger = loggers[0]
        self._param_names = [name for name, _ in pl_module.named_parameters()]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self._logger.experiment.add_custom_scalars(custom_scalars_layout())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        buckets = trainer.strategy.buckets
        if not buckets:
            return
        step = max(b.step for b in buckets.values())
        # Only once per step, and only after its optimizer step: with gradient accumulation this
        # hook also runs after micro-batches whose buckets are not final yet.
        if step <= self._last_step or trainer.global_step <= step:
            return
        self._last_step = step
        log_scalars, log_images = step % self.log_every_n_steps == 0, step % self.image_every_n_steps == 0
        if not (log_scalars or log_images):
            return
        current = [b for b in sorted(buckets.values(), key=lambda b: b.index) if b.step == step]
        names = language_names(trainer.strategy, current[0].gram.shape[0])
        writer = self._logger.experiment
        if log_scalars:
            for tag, value in conflict_scalars(current, names).items():
                writer.add_scalar(tag, value, step)
        if log_images:
            ordered = in_model_order(current, self._param_names)
            writer.add_figure("conflict/images/bucket_pair_cosines", bucket_pair_figure(ordered, names), step, close=True)
            cos = metrics.cosine_matrix(metrics.sum_grams(b.gram for b in current))
            writer.add_figure("conflict/images/language_cosines", language_cosine_figure(cos, names), step, close=True)
        writer.flush()


def in_model_order(buckets: list[BucketInfo], param_names: list[str]) -> list[BucketInfo]:
    """Buckets sorted by where their first parameter sits in ``param_names`` (``named_parameters()``
    order): DeepSpeed reduces in roughly backward order, the heatmap reads from the embeddings down.
    Buckets of unknown parameters go last, by reduction order."""
    position = {name: i for i, name in enumerate(param_names)}

    def key(bucket: BucketInfo) -> tuple[int, int]:
        known = [position[p.name] for p in bucket.params if p.name in position]
        return (min(known) if known else len(position), bucket.index)

    return sorted(buckets, key=key)


def language_names(strategy, num_languages: int) -> list[str]:
    languages = getattr(strategy, "languages", None)
    if isinstance(languages, (list, tuple)) and len(languages) == num_languages:
        return [str(x) for x in languages]
    return [f"lang{t}" for t in range(num_languages)]


def _group_scalars(prefix: str, pieces: list[metrics.Piece], names: list[str]) -> dict[str, float]:
    gram = metrics.sum_grams(p.gram for p in pieces)
    out = {
        f"{prefix}/cosine_mean": metrics.mean_cosine(gram),
        f"{prefix}/cosine_min": metrics.min_cosine(gram),
        f"{prefix}/conflict_ratio": metrics.conflict_ratio(gram),
    }
    for name, norm, weight in zip(names, metrics.grad_norms(gram).tolist(), metrics.mean_weights(pieces).tolist()):
        out[f"{prefix}/grad_norm/{name}"] = norm
        out[f"{prefix}/weight/{name}"] = weight
    return out


def conflict_scalars(buckets: list[BucketInfo], names: list[str]) -> dict[str, float]:
    """Every scalar ConflictMonitor logs for one step, by tag."""
    grams = [b.gram for b in buckets]
    total = metrics.sum_grams(grams)
    out = _group_scalars("conflict/global", [metrics.Piece.of_bucket(b) for b in buckets], names)
    pair_cos = metrics.pairwise_cosines(total).tolist()
    for (i, j), c in zip(metrics.language_pairs(len(names)), pair_cos):
        out[f"conflict/global/cosine/{names[i]}_{names[j]}"] = c
    out["conflict/global/gap_global"] = metrics.stationarity_gap(total)
    out["conflict/global/gap_bucket_sum"] = metrics.bucket_level_gap(grams)
    for by in ("kind", "layer"):
        for group, pieces in metrics.group_pieces(buckets, by).items():
            out.update(_group_scalars(f"conflict/{group}", pieces, names))
    for b in buckets:
        out.update(_group_scalars(f"conflict/bucket_{b.index}", [metrics.Piece.of_bucket(b)], names))
        out[f"conflict/bucket_{b.index}/gap"] = metrics.stationarity_gap(b.gram)
    return out


def custom_scalars_layout() -> dict:
    """TensorBoard custom-scalars layout (category → chart → ["Multiline", [tag regexes]])."""
    layout = {
        "conflict: whole model": {
            "pairwise cosine (mean, min)": ["Multiline", [r"conflict/global/cosine_(mean|min)"]],
            "cosine per language pair": ["Multiline", [r"conflict/global/cosine/.*"]],
            "conflict ratio": ["Multiline", [r"conflict/global/conflict_ratio"]],
            "gradient norm per language": ["Multiline", [r"conflict/global/grad_norm/.*"]],
            "solver weight per language": ["Multiline", [r"conflict/global/weight/.*"]],
            "stationarity gaps (global, bucket sum)": ["Multiline", [r"conflict/global/gap_.*"]],
        }
    }
    groups = {"module kinds": f"({_KINDS})", "layers": r"layer_[^/]+", "buckets": r"bucket_\d+"}
    for title, pattern in groups.items():
        layout[f"conflict: {title}"] = {
            chart: ["Multiline", [rf"conflict/{pattern}/{scalar}$"]] for chart, scalar in _GROUP_CHARTS.items()
        }
    layout["conflict: buckets"]["stationarity gap"] = ["Multiline", [r"conflict/bucket_\d+/gap$"]]
    return layout


def _short(name: str) -> str:
    # Wrappers repeat "model." (LightningModule.model → HF .model); the kind and layer are what matter.
    while name.startswith("model."):
        name = name[len("model.") :]
    return name.removesuffix(".weight")


def _bucket_label(bucket: BucketInfo) -> str:
    first, last = _short(bucket.params[0].name), _short(bucket.params[-1].name)
    span = first if len(bucket.params) == 1 else f"{first} … {last} ({len(bucket.params)} params)"
    return f"bucket {bucket.index}: {span}"


def bucket_pair_figure(buckets: list[BucketInfo], names: list[str]):
    """Heatmap: one row per bucket (in the given order), one column per language pair, colour = cosine."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training nodes
    import matplotlib.pyplot as plt

    pairs = metrics.language_pairs(len(names))
    values = [metrics.pairwise_cosines(b.gram).tolist() for b in buckets]
    # Room for the row labels (parameter names) on the left, then ~0.6 inch per language pair.
    fig, ax = plt.subplots(figsize=(5.5 + 0.6 * len(pairs), 1.8 + 0.3 * len(buckets)), dpi=100)
    # Gradients of high-dimensional blocks are often nearly orthogonal (|cos| ≪ 1): a symmetric
    # scale fitted to the data keeps that visible, and zero stays white.
    lim = max(0.05, max((abs(v) for row in values for v in row), default=0.0))
    image = ax.imshow(values, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(pairs)), [f"{names[i]}–{names[j]}" for i, j in pairs], rotation=45, ha="right")
    ax.set_yticks(range(len(buckets)), [_bucket_label(b) for b in buckets], fontsize=7)
    if len(buckets) * len(pairs) <= 200:  # small enough to print each value in its cell
        for r, row in enumerate(values):
            for c, value in enumerate(row):
                ax.text(c, r, f"{value:+.2f}", ha="center", va="center", fontsize=7)
    ax.set_xlabel("language pair")
    ax.set_title("gradient cosine per bucket (red = conflict)")
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    return fig


def language_cosine_figure(cos: Tensor, names: list[str]):
    """The T×T cosine matrix of the whole model's gradients, values written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = len(names)
    fig, ax = plt.subplots(figsize=(1.8 + 0.6 * T, 1.4 + 0.6 * T), dpi=100)
    image = ax.imshow(cos.tolist(), cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks(range(T), names, rotation=45, ha="right")
    ax.set_yticks(range(T), names)
    for i in range(T):
        for j in range(T):
            ax.text(j, i, f"{float(cos[i, j]):+.2f}", ha="center", va="center", fontsize=8)
    ax.set_title("whole-model gradient cosine")
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    return fig
