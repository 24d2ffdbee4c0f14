"""BucketMOOStrategy: DeepSpeed ZeRO (stage 1, 2 or 3) where every gradient bucket is combined by a MOO solver."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from ..buckets import BucketInfo, ParamRange
from ..exchange import make_exchange
from ..layout import LanguageLayout
from ..reducer import BucketReducer
from ..solvers import Mean, MOOSolver, Sum, resolve_solver
from .. import _compat
from .deepspeed import StockDeepSpeedStrategy
from .bucket_count import bucket_numel_for, warn_if_few_buckets
from .language_losses import LanguageLosses
from .solver_state import SolverStateInCheckpoints
from .zero3_hook import Zero3BucketHook
from .zero_hook import ZeroBucketHook

Mode = Literal["bucket", "global", "global_two_pass"]
# Weights that do not depend on the gradients: combining each micro-step's gradients equals
# combining their sum, so these may see ZeRO-2's per-micro-step reductions.
_LINEAR_SOLVERS = (Mean, Sum)


def stash_copy(grad: Tensor, device: Optional[str]) -> Tensor:
    """``grad`` where the stash lives (``None``: where it is).

    A CUDA gradient stashed in host memory goes to pinned memory by an asynchronous copy. A copy to
    pageable memory makes the host wait for the backward at every parameter, and the exchange's
    copies back would wait again inside every bucket's reduction. The stashed tensor is read only by
    those copies back, which run on a stream that waits for this one; PyTorch's pinned-memory
    allocator reuses a block only once the copies recorded on it have finished.
    """
    if device is None:
        return grad
    target = torch.device(device)
    if target.type == "cpu" and grad.is_cuda:
        return torch.empty(grad.shape, dtype=grad.dtype, pin_memory=True).copy_(grad, non_blocking=True)
    return grad.to(target)


class BucketMOOStrategy(LanguageLosses, SolverStateInCheckpoints, StockDeepSpeedStrategy):
    """DeepSpeed ZeRO stage 1, 2 or 3 with one language per rank (or per group of k ranks) and a MOO
    solver per gradient bucket.

    Rank t trains language t. Where stock data parallelism averages the languages' gradients of a
    bucket, this applies ``sum_t w_t g_t`` with ``w = solver(G)``, ``G`` the bucket's T×T Gram
    matrix. Loss scaling, clipping (of the combined gradient), overlap_comm and checkpoints stay
    DeepSpeed's. ZeRO-1/2 hand the solver the buckets of ``average_tensor``, ZeRO-3 those of its
    reduce-scatter (each rank still holds its language's whole gradient of the bucket's parameters).

    Args:
        solver: any :class:`~lightning_moo.solvers.MOOSolver` (in YAML: a registered name such as
            ``mgda``, or ``class_path`` + ``init_args``); default MGDA. ``Mean`` reproduces stock DeepSpeed.
        exchange: ``"sharded"`` (stock communication volume, one extra bucket of memory) or
            ``"allgather"`` (every rank gathers every language's bucket; the reference).
        mode: ``"bucket"`` (per ZeRO bucket); ``"global"`` (the whole model is one bucket: the
            global-MOO baseline); ``"global_two_pass"`` (the same global weights from the Gram of a
            first backward, then DeepSpeed's stock reduction of ``sum_t w_t L_t``).
        languages: number of languages T (or their names); default one per rank. The world size N
            and T make a :class:`~lightning_moo.layout.LanguageLayout`: N = T (one language per rank),
            N = k × T (ranks ``t·k … t·k + k - 1`` train language t: the solver combines the T
            language means, and exchange volume and memory stay those of one rank per language), or
            T = m × N down to one process (rank r trains languages ``r·m … r·m + m - 1``: the module
            calls ``stash_gradient(loss)`` for the first m - 1 and backpropagates the last; the buckets
            and the solver are those of a T-rank run).
        stash_device: where the m - 1 stashed gradients of a rank with several languages live;
            default the model's device (m - 1 extra gradient copies there). ``"cpu"`` keeps them in
            pinned host memory and moves one bucket's worth at a time to the device: device memory
            then grows by m - 1 buckets instead of m - 1 models, at the cost of host-device copies
            (asynchronous ones: the host does not wait for them).
        target_buckets: about this many buckets per step: ``reduce_bucket_size`` becomes the
            trainable parameter count divided by it (replacing any ``reduce_bucket_size`` given). For
            LoRA, whose gradients fit one default-sized bucket even for a 70B model. A run with fewer
            than 4 buckets per step is warned about after its first step.
        on_device: where a solver that can run on the gradients' device (MGDA and Mean for up to 12
            languages: ``solver.supports_on_device``) solves: ``None`` (default) on CUDA, so that no
            bucket waits for the host; ``True`` on CPU too; ``False`` always on the host (the exact
            active-set solvers, and an error raised in the bucket's own reduction rather than after
            the backward). Other solvers always solve on the host.
        **kwargs: everything Lightning's ``DeepSpeedStrategy`` takes (``stage``, ``config``, ...).
    """

    def __init__(
        self,
        solver: Optional[MOOSolver] = None,
        exchange: Literal["sharded", "allgather"] = "sharded",
        mode: Mode = "bucket",
        languages: Union[int, list[str], None] = None,
        stash_device: Optional[str] = None,
        target_buckets: Optional[int] = None,
        on_device: Optional[bool] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if target_buckets is not None and mode != "bucket":
            raise ValueError(f"target_buckets sizes the buckets of mode='bucket'; mode={mode!r} solves the whole model at once")
        if mode not in ("bucket", "global", "global_two_pass"):
            raise ValueError(f"mode must be 'bucket', 'global' or 'global_two_pass', got {mode!r}")
        self.solver = resolve_solver(solver)
        self.exchange = make_exchange(exchange)
        self.mode = mode
        self.languages = languages
        self.stash_device = stash_device
        self.target_buckets = target_buckets
        self.on_device = on_device
        self._bucket_count_checked = False
        self.layout: Optional[LanguageLayout] = None  # known once the world size is
        self.hook: Optional[ZeroBucketHook | Zero3BucketHook] = None
        self.global_info: Optional[BucketInfo] = None
        self._init_language_losses()

    @property
    def buckets(self) -> dict[int, BucketInfo]:
        """Per bucket of the last step: parameter names and element ranges, Gram matrix, weights."""
        if self.mode == "global_two_pass":
            return {0: self.global_info} if self.global_info is not None else {}
        return self.hook.buckets if self.hook is not None else {}

    @property
    def language(self) -> int:
        """The (first) language this rank trains."""
        assert self.layout is not None, "the layout is known from setup_distributed on"
        return self.layout.languages_of(self.global_rank)[0]

    def setup_distributed(self) -> None:
        _compat.require_internals("deepspeed")
        self.set_world_ranks()
        self.layout = LanguageLayout.build(self.languages, self.world_size)
        super().setup_distributed()

    def stash_gradient(self, loss: Tensor) -> None:
        """With m languages per rank: this language's gradient, kept for the buckets of this step.

        Call it for the first m - 1 languages' losses, then ``manual_backward`` the last one: the
        buckets DeepSpeed then reduces carry the last language's gradient, and the hook adds the
        stashed ones as the rank's other languages. Costs m - 1 gradient copies of the model.
        """
        weighs_losses = not self.solver.uses_gram
        if self.layout.languages_per_rank == 1 or (self.hook is None and not weighs_losses):
            raise RuntimeError(
                "stash_gradient is for several languages per rank (more languages than ranks) in mode='bucket' "
                "or 'global'; "
                "with one language per rank call manual_backward(loss)"
            )
        # A loss weighting scales this loss and backpropagates it with the last language's: keep it whole.
        self._stashed_losses.append(loss if weighs_losses else loss.detach())
        if weighs_losses:
            return
        params = [p for p in self.deepspeed_engine.module.parameters() if p.requires_grad]
        grads = self._invisible_grad(loss, params, retain_graph=False)
        self.hook.stash.append({id(p): stash_copy(g, self.stash_device) for p, g in zip(params, grads)})

    def init_deepspeed(self) -> None:
        self._check_config()
        if self.mode == "global":
            # One bucket holding every parameter: the global-MOO baseline that gathers full gradients.
            assert self.lightning_module is not None
            numel = sum(p.numel() for p in self.lightning_module.parameters() if p.requires_grad)
            self.config["zero_optimization"]["reduce_bucket_size"] = numel
        if self.target_buckets is not None:
            self.config["zero_optimization"]["reduce_bucket_size"] = bucket_numel_for(self.lightning_module, self.target_buckets)
        super().init_deepspeed()
        trainer = self.lightning_module.trainer
        if not (trainer and trainer.training):
            return  # validate/test/predict: DeepSpeed's inference engine, no gradients to combine
        self._check_optimizer()
        if self.mode != "global_two_pass" and self.solver.uses_gram:
            optimizer = self.deepspeed_engine.optimizer
            names = {id(p): n for n, p in self.deepspeed_engine.module.named_parameters()}
            # fp16 with dynamic loss scaling: DeepSpeed must see an overflow, skip the step and lower
            # the scale, exactly as it would for an averaged gradient.
            # On CUDA a solver that can solve on the device does (no host stall inside the backward).
            reducer = BucketReducer(self.solver, self.exchange, self.layout, "ZeRO", optimizer.dynamic_loss_scale,
                                    optimizer.dp_process_group, on_device=self.on_device)
            if self.zero_stage_3:
                self.hook = Zero3BucketHook(optimizer, reducer, names)
                _compat.install_stage3_bucket_reduction(optimizer, self.hook)
            else:
                self.hook = ZeroBucketHook(optimizer, reducer, names)
                _compat.install_bucket_reduction(optimizer, self.hook)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self.hook is not None and self.mode == "bucket" and self.hook.buckets and not self._bucket_count_checked:
            # The first step's buckets are known now; accumulation reduces the same ones per micro-step.
            self._bucket_count_checked = True
            size = self.config["zero_optimization"].get("reduce_bucket_size")
            warn_if_few_buckets(len(self.hook.buckets), self.lightning_module, f"reduce_bucket_size={size}")
        if self.hook is not None:
            self.hook.start_step(self.lightning_module.trainer.global_step)

    def backward(self, closure_loss: Tensor, optimizer, *args: Any, **kwargs: Any) -> Tensor:
        if self.solver.needs_losses:
            closure_loss = self._with_language_losses(closure_loss)
        if self.mode == "global_two_pass":
            w = self._global_weights(closure_loss)
            # DeepSpeed averages over the N = k·T ranks: scaling by N·w_t/k makes the average
            # sum_t w_t (mean gradient of language t).
            scale = self.world_size * w[self.language] / self.layout.ranks_per_language
            closure_loss = closure_loss * scale.to(closure_loss.dtype)
        loss = super().backward(closure_loss, optimizer, *args, **kwargs)
        if self.hook is not None:
            self.hook.reducer.check_step()  # what was solved on the device, checked before the step
        return loss

    def _global_weights(self, loss: Tensor) -> Tensor:
        """Weights of the solver for the Gram of the full per-language gradients.

        A first backward (``torch.autograd.grad``, which DeepSpeed's gradient hooks do not see)
        gives this language's gradient, held once as a plain backward would; the Gram is summed
        over chunks of ``reduce_bucket_size`` by the exchange, so no rank holds another language's.
        """
        named = [(n, p) for n, p in self.deepspeed_engine.module.named_parameters() if p.requires_grad]
        grads = self._invisible_grad(loss, [p for _, p in named], retain_graph=True)
        limit = int(self.config["zero_optimization"].get("reduce_bucket_size", 500_000_000))
        T = self.layout.num_languages
        g = torch.zeros(T, T, dtype=torch.float64, device=loss.device)
        chunk: list[Tensor] = []
        size = 0
        for grad in grads + [None]:
            if chunk and (grad is None or size + grad.numel() > limit):
                g += self.exchange.gram(torch.cat([c.reshape(-1) for c in chunk]), self.layout)
                chunk, size = [], 0
            if grad is not None:
                chunk.append(grad)
                size += grad.numel()
        step = self.lightning_module.trainer.global_step
        w = self.solver(g, bucket="global", step=step, losses=self.language_losses)
        offset, ranges = 0, []
        for n, p in named:
            ranges.append(ParamRange(n, offset, offset + p.numel()))
            offset += p.numel()
        self.global_info = BucketInfo(0, tuple(ranges), offset, g.cpu(), w.detach().to("cpu", torch.float64), step)
        return w

    def _invisible_grad(self, loss: Tensor, params: list[Tensor], retain_graph: bool) -> list[Tensor]:
        """``torch.autograd.grad`` that DeepSpeed does not see: no reduction, no .grad written."""
        with _compat.invisible_to_engine(self.deepspeed_engine):
            grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    def _check_config(self) -> None:
        """Refuse, before the first step, every configuration the hook cannot serve correctly."""
        assert isinstance(self.config, dict)
        zero = self.config.get("zero_optimization") or {}
        stage = int(zero.get("stage", 0))
        if stage not in (1, 2, 3):
            raise MisconfigurationException(
                f"BucketMOOStrategy needs ZeRO stage 1, 2 or 3 (got stage {stage}): without ZeRO there are no "
                "gradient buckets."
            )
        if stage == 3:
            self._check_stage3(zero)
            if self.mode == "global_two_pass":
                raise MisconfigurationException(
                    "mode='global_two_pass' does not work with ZeRO stage 3: its first backward releases the "
                    "gathered parameters that the second one needs. Use mode='global' (the same global weights, "
                    "from the one backward)."
                )
        elif not zero.get("contiguous_gradients", True):
            raise MisconfigurationException(
                "BucketMOOStrategy needs zero_optimization.contiguous_gradients=true: without it DeepSpeed "
                "reduces gradients through buffered_reduce_fallback, bypassing the per-bucket solver."
            )
        accumulation = int(self.config.get("gradient_accumulation_steps", 1))
        if not self.solver.uses_gram and (self.mode != "bucket" or accumulation > 1):
            raise MisconfigurationException(
                f"{type(self.solver).__name__} weighs each optimizer step's losses before the backward: use "
                f"mode='bucket' (got {self.mode!r}) and accumulate_grad_batches=1 (got {accumulation})."
            )
        m = self.layout.languages_per_rank
        if m > 1 and (self.mode == "global_two_pass" or accumulation > 1):
            raise MisconfigurationException(
                f"{m} languages per rank work in mode='bucket' or 'global' without gradient "
                f"accumulation (got mode={self.mode!r}, accumulate_grad_batches={accumulation}); use as many "
                "ranks as languages for global_two_pass (mode='global' computes the same weights)"
            )
        if accumulation > 1 and self.mode != "bucket":
            raise MisconfigurationException(
                f"mode={self.mode!r} does not support gradient accumulation (accumulate_grad_batches="
                f"{accumulation}): the global weights are computed per backward."
            )
        if accumulation > 1 and stage in (2, 3) and not isinstance(self.solver, _LINEAR_SOLVERS):
            raise MisconfigurationException(
                f"ZeRO-{stage} reduces every micro-batch, so with accumulate_grad_batches={accumulation} "
                f"{type(self.solver).__name__} would combine micro-batch gradients instead of each "
                "language's accumulated gradient. Use ZeRO stage 1 (reduces once per optimizer step) or "
                "accumulate_grad_batches=1."
            )

    @staticmethod
    def _check_stage3(zero: dict) -> None:
        """ZeRO-3 options that reduce gradients outside the bucket's reduce-scatter, or over a group
        other than all ranks, would leave the solver out or see only some languages."""
        if zero.get("zero_quantized_gradients"):
            raise MisconfigurationException(
                "zero_optimization.zero_quantized_gradients (ZeRO++ qgZ) reduces gradients by a quantized "
                "all-to-all instead of the reduce-scatter the per-bucket solver replaces; set it to false."
            )
        if int(zero.get("mics_shard_size", -1)) > 0:
            raise MisconfigurationException(
                "zero_optimization.mics_shard_size partitions parameters over groups smaller than the world, "
                "so a bucket's reduce-scatter would not meet every language; remove it for BucketMOOStrategy."
            )

    def _check_optimizer(self) -> None:
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        optimizer = self.deepspeed_engine.optimizer
        if self.zero_stage_3:
            if not isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
                raise MisconfigurationException(
                    f"DeepSpeed chose {type(optimizer).__name__} instead of its ZeRO-3 optimizer, which never "
                    "calls the per-bucket solver."
                )
        elif not isinstance(optimizer, DeepSpeedZeroOptimizer):
            raise MisconfigurationException(
                f"DeepSpeed chose {type(optimizer).__name__} instead of its ZeRO-1/2 optimizer, which never "
                "calls the per-bucket solver. This happens for ZeRO stage 1 with bf16 and fp32 gradient "
                "accumulation: use ZeRO stage 2, or set data_types.grad_accum_dtype to 'bf16'."
            )
        if dist.get_world_size(optimizer.dp_process_group) != self.world_size:
            raise MisconfigurationException(
                "BucketMOOStrategy needs pure data parallelism over all ranks; DeepSpeed's "
                "data-parallel group is smaller than the world."
            )
