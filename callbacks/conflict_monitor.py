"""ConflictMonitor: gradient-conflict metrics in TensorBoard from the Gram matrices bucket-level MOO already has.

BucketMOOStrategy all-reduces one T×T Gram matrix per ZeRO bucket to run its solver, so every rank
ends each step holding ``trainer.strategy.buckets``. Everything logged here is a function of those
Grams and the solver's weights: no gradient is copied and nothing is communicated. Rank zero logs;
the other ranks return at once.
"""

from __future__ import annotations

import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_moo import metrics
from lightning_moo.buckets import BucketInfo
from lightning_moo.tensorboard import RunWriters, figure_pixels

from .conflict_figures import draw_images, in_model_order  # noqa: F401 (in_model_order: public here too)
from .conflict_records import SHADOW_SOLVERS, Limits, Shadow, conflict_records, default_shadows, language_run

_KINDS = "|".join(re.escape(k) for k in (*metrics.MODULE_KINDS, "mixed"))
# Per-group scalars, each a chart of one row of the custom-scalars dashboard.
_GROUP_CHARTS = {
    "mean pairwise cosine": "cosine_mean",
    "min pairwise cosine": "cosine_min",
    "conflict ratio (share of pairs with cos < 0)": "conflict_ratio",
}


class ConflictMonitor(pl.Callback):
    """Log gradient conflict between languages, per bucket, layer, module kind and for the whole model,
    with every per-language series in a TensorBoard run of its own (one named colour per language).

    Every ``log_every_n_steps`` optimizer steps (step s is logged when ``s % log_every_n_steps == 0``),
    in the logger's run:

    * ``conflict/global/``: ``cosine_mean``, ``cosine_min``, ``conflict_ratio`` from the whole model's
      Gram Σ_b G_b, ``gap_global`` (‖min-norm point‖² of Σ_b G_b), ``gap_bucket_sum``
      (Σ_b ‖min-norm point of G_b‖²) and ``direction_norm`` (‖d‖ of the applied direction);
    * direction diagnostics: each shadow direction d_x — the ``shadow_solvers`` run on every bucket's
      Gram (``mean_bucket``, ``mgda_bucket``, ``cagrad_bucket``), MGDA on Σ_b G_b (``mgda_global``) and a
      copy of the running solver on Σ_b G_b (``solver_global``; not for a stateful solver) — gets
      ``conflict/global/direction_norm_<x>`` (‖d_x‖) and ``conflict/global/direction_cos_<x>``
      (cos(d, d_x)) in the logger's run and ``conflict/global/progress_<x>`` (⟨g_t, d_x⟩/‖d_x‖) in each
      language's run;
    * the same cosine and ratio scalars under ``conflict/<kind>/`` (embeddings, attention, mlp, norms,
      head, other; split exactly by parameter, ``mixed`` only for a global_two_pass bucket spanning
      several kinds), ``conflict/layer_<i>/`` and ``conflict/bucket_<i>/`` (i = order of reduction;
      buckets also get ``gap``);

    in the run ``language/<name>`` of each language, under tags shared by all languages:
    ``by_language/grad_norm``, ``by_language/solver_weight`` (the whole model's; solver weights averaged
    over the elements), ``by_language/progress`` (first-order decrease of the language's loss per unit
    step along the applied direction), ``conflict/<group>/grad_norm`` and ``conflict/<group>/weight``
    for every other group, and the module's per-language metrics mirrored from ``train/loss_<name>``,
    ``val/bpb_<name>``, … as ``by_language/train_loss``, ``by_language/val_bpb``, …; in the run
    ``pair/<a>-<b>`` of each language pair: ``by_pair/cosine``. The ``by_`` groups sort first on
    TensorBoard's Scalars and Time Series pages.

    Above ``max_bucket_scalars`` buckets the per-bucket scalars become histograms over buckets
    (``conflict/buckets/...``); above ``max_layer_scalars`` transformer blocks the per-layer scalars
    become ``layer_groups`` contiguous groups (``conflict/layers_<a>-<b>/``) plus histograms over
    layers (``conflict/layers/...``), so the tags per logged step stay bounded
    (:func:`~lightning_moo.callbacks.conflict_records.scalar_bounds`).

    Every ``image_every_n_steps`` steps four images under ``conflict/images/``: ``bucket_pair_cosines``
    (buckets in model order × language pairs), ``bucket_step_cosines`` (buckets × the last ``history``
    logged steps), ``layer_profile`` (cosines and weights per transformer block) and
    ``language_cosines`` (whole model).

    Rank zero computes, draws and writes all of this on a niced background thread
    (``background=False``: inline), so a logged step blocks the training loop almost not at all; everything is written by the end of
    ``fit`` (or at :meth:`wait`), and a failure on that thread is raised at the next step.

    Needs ``BucketMOOStrategy`` (or ``BucketMOODDPStrategy``) and a ``TensorBoardLogger``. Language
    names come from the strategy's ``languages`` list, else ``lang<t>``. With gradient accumulation
    under ZeRO-2 the Grams are those of the last micro-batch (ZeRO-2 reduces every micro-batch); under
    ZeRO-1 those of the step.
    """

    def __init__(
        self,
        log_every_n_steps: int = 50,
        image_every_n_steps: int = 500,
        max_bucket_scalars: int = 16,
        max_layer_scalars: int = 8,
        layer_groups: int = 4,
        history: int = 200,
        background: bool = True,
        shadow_solvers: Sequence[str] = SHADOW_SOLVERS,
    ) -> None:
        super().__init__()
        if log_every_n_steps < 1 or image_every_n_steps < 1 or history < 1:
            raise ValueError(
                f"log_every_n_steps, image_every_n_steps and history must be ≥ 1, got {log_every_n_steps}, "
                f"{image_every_n_steps} and {history}"
            )
        self.log_every_n_steps = log_every_n_steps
        self.image_every_n_steps = image_every_n_steps
        self.limits = Limits(max_bucket_scalars, max_layer_scalars, layer_groups)
        self.history = history
        self.background = background
        self.shadow_solvers = tuple(shadow_solvers)
        # Built again at setup with the running solver; here already, so that a solver that cannot
        # be replayed is refused when the monitor is made.
        self._shadows: tuple[Shadow, ...] = default_shadows(self.shadow_solvers)
        self._needs_losses = False
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: list[Future] = []
        self._logger: Optional[TensorBoardLogger] = None
        self._runs: Optional[RunWriters] = None
        self._param_names: list[str] = []
        self._last_step = -1
        self._last_mirrored = -1
        self._bucket_cosines: dict[int, dict[int, float]] = {}  # logged step → bucket index → mean cosine

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
        self._shadows = default_shadows(self.shadow_solvers, running=getattr(trainer.strategy, "solver", None))
        self._needs_losses = any(s.solver.needs_losses for s in self._shadows)

    def layout(self) -> dict:
        """The custom-scalars layout this monitor writes (its shadow directions' charts included)."""
        return custom_scalars_layout([s.tag for s in self._shadows])

    @property
    def runs(self) -> RunWriters:
        """The logger's run and the language and pair runs below its directory (rank zero only)."""
        if self._runs is None:
            self._runs = RunWriters(self._logger.experiment, Path(self._logger.log_dir))
        return self._runs

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.wait()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            if self._runs is not None:
                self._runs.close()
                self._runs = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.runs[""].add_custom_scalars(self.layout())
            # TensorBoard colours runs in the order it finds them, cycling a palette of seven: the
            # language runs come first, so that up to six languages never share a colour (pairs follow).
            for language in known_languages(trainer, pl_module):
                self.runs[language_run(language)]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        self._mirror_training_metrics(trainer, pl_module)
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
        # A copy: the strategy's tensor is replaced, not updated, each step, but the writer thread
        # must not depend on that. None when the solver gathers no losses (its shadow is left out).
        losses = getattr(trainer.strategy, "language_losses", None) if self._needs_losses and log_scalars else None
        losses = None if losses is None else losses.detach().to("cpu", torch.float64, copy=True)
        self._submit(self._write_step, current, names, step, log_scalars, log_images, losses)

    def _write_step(self, current: list[BucketInfo], names: list[str], step: int, log_scalars: bool, log_images: bool,
                    losses: Optional[torch.Tensor] = None) -> None:
        # The bucket × step history lives on the writer thread alone (one worker: steps arrive in order).
        self._bucket_cosines[step] = {b.index: metrics.mean_cosine(b.gram) for b in current}
        for old in sorted(self._bucket_cosines)[: -self.history]:
            del self._bucket_cosines[old]
        if log_scalars:
            records = conflict_records(current, names, self.limits, self._shadows, losses)
            for run, tags in records.scalars.items():
                writer = self.runs[run]
                for tag, value in tags.items():
                    writer.add_scalar(tag, value, step)
            for run, tags in records.histograms.items():
                writer = self.runs[run]
                for tag, values in tags.items():
                    writer.add_histogram(tag, values, step)
        if log_images:
            for name, figure in draw_images(current, names, self._param_names, self._bucket_cosines).items():
                self.runs[""].add_image(f"conflict/images/{name}", figure_pixels(figure), step, dataformats="HWC")
        self.runs.flush()

    def _submit(self, work, *args) -> None:
        """Run ``work`` on the monitor's writer thread, in order, after re-raising any earlier failure.

        Rank zero hands each logged step to one background thread, so that computing the metrics,
        drawing the images and writing the events overlap the next steps' compute and communication
        instead of holding the other ranks at the next collective. The records hold only the step's
        Gram matrices (fresh BucketInfo objects each step), so nothing is shared with training."""
        self._raise_failures()
        if not self.background:
            work(*args)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conflict-monitor", initializer=_lower_priority)
        self._pending.append(self._pool.submit(work, *args))

    def _raise_failures(self) -> None:
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for future in done:
            future.result()  # re-raises what failed on the writer thread

    def wait(self) -> None:
        """Block until everything handed to the writer thread is written; re-raise its first failure."""
        for future in self._pending:
            future.result()
        self._pending = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            # During fit Lightning logs validation at the step count before this step's increment.
            fitting = getattr(getattr(trainer, "state", None), "fn", None) == "fit"
            self._mirror(trainer, pl_module, "val", trainer.global_step - 1 if fitting else trainer.global_step)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self._mirror(trainer, pl_module, "test", trainer.global_step)

    def _mirror_training_metrics(self, trainer: pl.Trainer, pl_module) -> None:
        # The steps Lightning's own logger writes: step s (counted from 0) when (s + 1) % log_every_n_steps == 0.
        step = trainer.global_step - 1
        every = trainer.log_every_n_steps
        if step > self._last_mirrored and every and (step + 1) % every == 0:
            self._last_mirrored = step
            self._mirror(trainer, pl_module, "train", step)

    def _mirror(self, trainer: pl.Trainer, pl_module, stage: str, step: int) -> None:
        """The module's ``<stage>/<metric>_<language>`` values into the language runs as
        ``by_language/<stage>_<metric>``."""
        per_language = split_by_language(trainer.callback_metrics, stage, known_languages(trainer, pl_module))
        if per_language:
            self._submit(self._write_mirror, per_language, step)

    def _write_mirror(self, per_language: dict[str, dict[str, float]], step: int) -> None:
        for language, values in per_language.items():
            writer = self.runs[language_run(language)]
            for key, value in values.items():
                writer.add_scalar(f"by_language/{key.replace('/', '_')}", value, step)  # val/bpb → by_language/val_bpb
        self.runs.flush()


def _lower_priority() -> None:
    """Nice the writer thread (Linux: a thread is its own task), so that on a machine whose cores are
    all busy training, the scheduler gives the ranks' compute precedence."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not permitted: the thread runs at normal priority
        pass


def known_languages(trainer: pl.Trainer, pl_module) -> list[str]:
    """Training languages (the strategy's) and evaluation languages (the module's ``kinds``)."""
    languages = getattr(trainer.strategy, "languages", None)
    names = [str(x) for x in languages] if isinstance(languages, (list, tuple)) else []
    names += [str(x) for x in getattr(pl_module, "kinds", {}) or {} if str(x) not in names]
    return names


def split_by_language(values, stage: str, languages: list[str]) -> dict[str, dict[str, float]]:
    """``{"train/loss_deu": v}`` → ``{"deu": {"train/loss": v}}`` for known languages (longest name first,
    so ``eng_Latn`` is not read as a language ``Latn``); other keys are left out."""
    out: dict[str, dict[str, float]] = {}
    longest_first = sorted(languages, key=len, reverse=True)
    for key, value in values.items():
        if not key.startswith(f"{stage}/"):
            continue
        for language in longest_first:
            if key.endswith(f"_{language}") and len(key) > len(stage) + len(language) + 2:
                out.setdefault(language, {})[key[: -len(language) - 1]] = float(value)
                break
    return out


def language_names(strategy, num_languages: int) -> list[str]:
    languages = getattr(strategy, "languages", None)
    if isinstance(languages, (list, tuple)) and len(languages) == num_languages:
        return [str(x) for x in languages]
    return [f"lang{t}" for t in range(num_languages)]


def custom_scalars_layout(shadow_tags: Sequence[str] = ()) -> dict:
    """TensorBoard custom-scalars layout (category → chart → ["Multiline", [tag regexes]]). A chart shows
    each matching tag of every run: the per-language tags once per language run, in its colour.
    ``shadow_tags`` (:attr:`Shadow.tag`) get a progress chart each."""
    layout = {
        "languages": {
            "training loss (mean and per language)": ["Multiline", [r"train/loss$", r"by_language/train_loss$"]],
            "solver weight per language (whole model)": ["Multiline", [r"by_language/solver_weight$"]],
            "progress: loss decrease per unit step along the update": ["Multiline", [r"by_language/progress$"]],
            "gradient norm per language": ["Multiline", [r"by_language/grad_norm$"]],
            "validation bits per byte": ["Multiline", [r"by_language/val_bpb$"]],
            "loss weight (loss-based weightings)": ["Multiline", [r"by_language/train_loss_weight$"]],
        },
        "conflict: whole model": {
            "pairwise cosine (mean, min)": ["Multiline", [r"conflict/global/cosine_(mean|min)"]],
            "cosine per language pair": ["Multiline", [r"by_pair/cosine$"]],
            "conflict ratio": ["Multiline", [r"conflict/global/conflict_ratio"]],
            "stationarity gaps (global, bucket sum)": ["Multiline", [r"conflict/global/gap_.*"]],
            "norm of the applied direction": ["Multiline", [r"conflict/global/direction_norm$"]],
        },
        "direction: applied vs. shadow solvers": {
            "norm: applied (direction_norm) and shadow directions": ["Multiline", [r"conflict/global/direction_norm"]],
            "cosine of the applied direction with each shadow direction": ["Multiline", [r"conflict/global/direction_cos_"]],
            "progress per language: applied": ["Multiline", [r"by_language/progress$"]],
            **{f"progress per language: {tag}": ["Multiline", [rf"conflict/global/progress_{re.escape(tag)}$"]] for tag in shadow_tags},
        },
    }
    groups = {"module kinds": f"({_KINDS})", "layers": r"layers?_[^/]+", "buckets": r"bucket_\d+"}
    for title, pattern in groups.items():
        layout[f"conflict: {title}"] = {
            title: ["Multiline", [rf"conflict/{pattern}/{scalar}$"]] for title, scalar in _GROUP_CHARTS.items()
        }
    layout["conflict: buckets"]["stationarity gap"] = ["Multiline", [r"conflict/bucket_\d+/gap$"]]
    return layout
