"""BucketMOOStrategy: DeepSpeed ZeRO-1/2 where every gradient bucket is combined by a MOO solver."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from ..buckets import BucketInfo, ParamRange
from ..exchange import make_exchange
from ..solvers import MGDA, Mean, MOOSolver, Sum
from .deepspeed import StockDeepSpeedStrategy
from .solver_state import SolverStateInCheckpoints
from .zero_hook import ZeroBucketHook

Mode = Literal["bucket", "global", "global_two_pass"]
# Weights that do not depend on the gradients: combining each micro-step's gradients equals
# combining their sum, so these may see ZeRO-2's per-micro-step reductions.
_LINEAR_SOLVERS = (Mean, Sum)


class BucketMOOStrategy(SolverStateInCheckpoints, StockDeepSpeedStrategy):
    """DeepSpeed ZeRO stage 1 or 2 with one language per rank (or per group of k ranks) and a MOO
    solver per gradient bucket.

    Rank t trains language t. Where stock data parallelism averages the languages' gradients of a
    bucket, this applies ``sum_t w_t g_t`` with ``w = solver(G)``, ``G`` the bucket's T×T Gram
    matrix. Loss scaling, clipping (of the combined gradient), overlap_comm and checkpoints stay
    DeepSpeed's.

    Args:
        solver: any :class:`~lightning_moo.solvers.MOOSolver` (in YAML: ``class_path`` + ``init_args``);
            default MGDA. ``Mean`` reproduces stock DeepSpeed.
        exchange: ``"sharded"`` (stock communication volume, one extra bucket of memory) or
            ``"allgather"`` (every rank gathers every language's bucket; the reference).
        mode: ``"bucket"`` (per ZeRO bucket); ``"global"`` (the whole model is one bucket: the
            global-MOO baseline); ``"global_two_pass"`` (the same global weights from the Gram of a
            first backward, then DeepSpeed's stock reduction of ``sum_t w_t L_t``).
        languages: number of languages T (or their names); the world size must be a multiple k × T.
            Ranks ``t·k … t·k + k - 1`` train language t (a language group): the solver combines the
            T language means, and exchange volume and memory stay those of one rank per language.
            With more languages than ranks (T = m × world size, down to one process), rank r trains
            languages ``r·m … r·m + m - 1``: the module calls ``stash_gradient(loss)`` for the first m - 1
            and backpropagates the last; the buckets and the solver are those of a T-rank run.
            Default: one language per rank.
        stash_device: where the m - 1 stashed gradients of a rank with several languages live;
            default the model's device (m - 1 extra gradient copies there). ``"cpu"`` keeps them in
            host memory and moves one bucket's worth at a time to the device: device memory then
            grows by m - 1 buckets instead of m - 1 models, at the cost of host-device copies.
        **kwargs: everything Lightning's ``DeepSpeedStrategy`` takes (``stage``, ``config``, ...).
    """

    def __init__(
        self,
        solver: Optional[MOOSolver] = None,
        exchange: Literal["sharded", "allgather"] = "sharded",
        mode: Mode = "bucket",
        languages: Union[int, list[str], None] = None,
        stash_device: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if mode not in ("bucket", "global", "global_two_pass"):
            raise ValueError(f"mode must be 'bucket', 'global' or 'global_two_pass', got {mode!r}")
        self.solver = solver if solver is not None else MGDA()
        self.exchange = make_exchange(exchange)
        self.mode = mode
        self.languages = languages
        self.stash_device = stash_device
        self.hook: Optional[ZeroBucketHook] = None
        self.global_info: Optional[BucketInfo] = None
        self.languages_per_rank = 1

    @property
    def buckets(self) -> dict[int, BucketInfo]:
        """Per bucket of the last step: parameter names and element ranges, Gram matrix, weights."""
        if self.mode == "global_two_pass":
            return {0: self.global_info} if self.global_info is not None else {}
        return self.hook.buckets if self.hook is not None else {}

    @property
    def num_languages(self) -> int:
        if self.languages is None:
            return self.world_size
        return self.languages if isinstance(self.languages, int) else len(self.languages)

    @property
    def language(self) -> int:
        """The (first) language this rank trains: ranks ``t·k … t·k + k - 1`` form language t's
        group; with m languages per rank, rank r trains ``r·m … r·m + m - 1``."""
        return self.global_rank * self.languages_per_rank // self.exchange.ranks_per_language

    def setup_distributed(self) -> None:
        self.set_world_ranks()
        languages, world = self.num_languages, self.world_size
        if languages >= world and languages % world:
            raise MisconfigurationException(
                f"BucketMOOStrategy trains the same number of languages on every rank: {languages} languages "
                f"do not split over world size {world} (devices × num_nodes). Use a world size that divides "
                f"{languages} (e.g. 1 or {languages}), or train a multiple of {world} languages."
            )
        if languages < world and world % languages:
            raise MisconfigurationException(
                f"BucketMOOStrategy trains each language on k ranks: world size {world} (devices × num_nodes) "
                f"is not a multiple of {languages} languages. Use k × {languages} devices (e.g. {languages} or "
                f"{2 * languages}), or train {world} languages."
            )
        self.exchange.ranks_per_language = max(world // languages, 1)
        self.languages_per_rank = max(languages // world, 1)
        super().setup_distributed()

    def stash_gradient(self, loss: Tensor) -> None:
        """With m languages per rank: this language's gradient, kept for the buckets of this step.

        Call it for the first m - 1 languages' losses, then ``manual_backward`` the last one: the
        buckets DeepSpeed then reduces carry the last language's gradient, and the hook adds the
        stashed ones as the rank's other languages. Costs m - 1 gradient copies of the model.
        """
        if self.languages_per_rank == 1 or self.hook is None:
            raise RuntimeError(
                "stash_gradient is for several languages per rank (more languages than ranks) in mode='bucket' "
                "or 'global'; "
                "with one language per rank call manual_backward(loss)"
            )
        named = [(n, p) for n, p in self.deepspeed_engine.module.named_parameters() if p.requires_grad]
        grads = self._invisible_grad(loss, [p for _, p in named], retain_graph=False)
        device = self.stash_device
        self.hook.stash.append({id(p): g if device is None else g.to(device) for (_, p), g in zip(named, grads)})

    def init_deepspeed(self) -> None:
        self._check_config()
        if self.mode == "global":
            # One bucket holding every parameter: the global-MOO baseline that gathers full gradients.
            assert self.lightning_module is not None
            numel = sum(p.numel() for p in self.lightning_module.parameters() if p.requires_grad)
            self.config["zero_optimization"]["reduce_bucket_size"] = numel
        super().init_deepspeed()
        trainer = self.lightning_module.trainer
        if not (trainer and trainer.training):
            return  # validate/test/predict: DeepSpeed's inference engine, no gradients to combine
        self._check_optimizer()
        if self.mode != "global_two_pass":
            optimizer = self.deepspeed_engine.optimizer
            names = {id(p): n for n, p in self.deepspeed_engine.module.named_parameters()}
            self.hook = ZeroBucketHook(optimizer, self.solver, self.exchange, names)
            self.hook.languages_per_rank = self.languages_per_rank
            optimizer.average_tensor = self.hook

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self.hook is not None:
            self.hook.start_step(self.lightning_module.trainer.global_step)

    def backward(self, closure_loss: Tensor, optimizer, *args: Any, **kwargs: Any) -> Tensor:
        if self.mode == "global_two_pass":
            w = self._global_weights(closure_loss)
            # DeepSpeed averages over the N = k·T ranks: scaling by N·w_t/k makes the average
            # sum_t w_t (mean gradient of language t).
            scale = self.world_size * w[self.language] / self.exchange.ranks_per_language
            closure_loss = closure_loss * scale.to(closure_loss.dtype)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def _global_weights(self, loss: Tensor) -> Tensor:
        """Weights of the solver for the Gram of the full per-language gradients.

        A first backward (``torch.autograd.grad``, which DeepSpeed's gradient hooks do not see)
        gives this language's gradient, held once as a plain backward would; the Gram is summed
        over chunks of ``reduce_bucket_size`` by the exchange, so no rank holds another language's.
        """
        named = [(n, p) for n, p in self.deepspeed_engine.module.named_parameters() if p.requires_grad]
        grads = self._invisible_grad(loss, [p for _, p in named], retain_graph=True)
        limit = int(self.config["zero_optimization"].get("reduce_bucket_size", 500_000_000))
        g = torch.zeros(self.num_languages, self.num_languages, dtype=torch.float64, device=loss.device)
        chunk: list[Tensor] = []
        size = 0
        for grad in grads + [None]:
            if chunk and (grad is None or size + grad.numel() > limit):
                g += self.exchange.gram(torch.cat([c.reshape(-1) for c in chunk]))
                chunk, size = [], 0
            if grad is not None:
                chunk.append(grad)
                size += grad.numel()
        step = self.lightning_module.trainer.global_step
        w = self.solver(g, bucket="global", step=step)
        offset, ranges = 0, []
        for n, p in named:
            ranges.append(ParamRange(n, offset, offset + p.numel()))
            offset += p.numel()
        self.global_info = BucketInfo(0, tuple(ranges), offset, g.cpu(), w.detach().to("cpu", torch.float64), step)
        return w

    def _invisible_grad(self, loss: Tensor, params: list[Tensor], retain_graph: bool) -> list[Tensor]:
        """``torch.autograd.grad`` that DeepSpeed does not see: no reduction, no .grad written."""
        engine = self.deepspeed_engine
        # DeepSpeed hooks the forward outputs: any backward through them starts its backward
        # prologue and queues the gradient reduction. Shadow the prologue so that this pass stays
        # invisible (its parameter hooks only fire on .grad accumulation, which autograd.grad skips).
        engine._backward_prologue = lambda: None
        try:
            grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
        finally:
            del engine._backward_prologue
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    def _check_config(self) -> None:
        """Refuse, before the first step, every configuration the hook cannot serve correctly."""
        assert isinstance(self.config, dict)
        zero = self.config.get("zero_optimization") or {}
        stage = int(zero.get("stage", 0))
        if stage not in (1, 2):
            raise MisconfigurationException(
                f"BucketMOOStrategy needs ZeRO stage 1 or 2 (got stage {stage}): without ZeRO there are no "
                "gradient buckets, and ZeRO-3 reduces gradients through a path the per-bucket solver does not hook."
            )
        if not zero.get("contiguous_gradients", True):
            raise MisconfigurationException(
                "BucketMOOStrategy needs zero_optimization.contiguous_gradients=true: without it DeepSpeed "
                "reduces gradients through buffered_reduce_fallback, bypassing the per-bucket solver."
            )
        accumulation = int(self.config.get("gradient_accumulation_steps", 1))
        if self.languages_per_rank > 1 and (self.mode == "global_two_pass" or accumulation > 1):
            raise MisconfigurationException(
                f"{self.languages_per_rank} languages per rank work in mode='bucket' or 'global' without gradient "
                f"accumulation (got mode={self.mode!r}, accumulate_grad_batches={accumulation}); use as many "
                "ranks as languages for global_two_pass (mode='global' computes the same weights)"
            )
        if accumulation > 1 and self.mode != "bucket":
            raise MisconfigurationException(
                f"mode={self.mode!r} does not support gradient accumulation (accumulate_grad_batches="
                f"{accumulation}): the global weights are computed per backward."
            )
        if accumulation > 1 and stage == 2 and not isinstance(self.solver, _LINEAR_SOLVERS):
            raise MisconfigurationException(
                f"ZeRO-2 reduces every micro-batch, so with accumulate_grad_batches={accumulation} "
                f"{type(self.solver).__name__} would combine micro-batch gradients instead of each "
                "language's accumulated gradient. Use ZeRO stage 1 (reduces once per optimizer step) or "
                "accumulate_grad_batches=1."
            )

    def _check_optimizer(self) -> None:
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        optimizer = self.deepspeed_engine.optimizer
        if not isinstance(optimizer, DeepSpeedZeroOptimizer):
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
