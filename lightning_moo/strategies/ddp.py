"""BucketMOODDPStrategy: PyTorch DDP where every gradient bucket is combined by a MOO solver."""

# No ``from __future__ import annotations``: DDP compares the comm hook's annotations with the real
# ``dist.GradBucket`` and ``Future[torch.Tensor]`` objects and rejects strings.

import queue
import threading
from typing import Any, Literal, Optional, Union

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from ..buckets import Bucket, BucketInfo, ParamRange, Segment, even_segments
from ..exchange import make_exchange
from ..layout import LanguageLayout
from ..reducer import BucketReducer
from ..solvers import MOOSolver, resolve_solver
from .. import _compat
from .atomic import DEFAULT_TIMEOUT, AtomicCheckpoints
from .bucket_count import bucket_numel_for, warn_if_few_buckets
from .language_losses import LanguageLosses
from .solver_state import SolverStateInCheckpoints

# DDPStrategy arguments that would replace our comm hook or average outside it.
_CONFLICTING = ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper", "model_averaging_period", "delay_all_reduce_named_params")


class DDPBucketHook:
    """The state of the comm hook: describes each ``GradBucket`` DDP reduces and lets the reducer
    combine it.

    ``bucket.buffer()`` is this rank's flat, unreduced gradient of ``bucket.parameters()`` (laid out
    one after another); DDP copies the tensor the hook's future holds into the parameters' ``.grad``.
    Every rank needs the whole combined bucket, unlike ZeRO where a rank keeps only its partition:
    rank r combines the r-th even slice (the sharded exchange's own split, so nothing moves in its
    second all-to-all) and the slices are then gathered on every rank.

    The hook returns at once and one worker thread reduces the buckets, strictly in the order DDP
    hands them over (bucket index order, the same on every rank), so the backward goes on computing
    the next buckets' gradients meanwhile, as it does during DDP's own all-reduce. Only that thread
    issues collectives on ``reducer.group``, a process group of its own: DDP (the used-parameter
    all-reduce of ``find_unused_parameters``, issued by the backward while buckets are still being
    reduced) and Lightning keep issuing theirs on the default group from other threads, and
    collectives of one group issued from two threads could pair up differently on different ranks.
    """

    def __init__(self, reducer: BucketReducer, names: dict[int, str], device: torch.device) -> None:
        self.reducer, self.names, self.device = reducer, names, device
        self.error: Optional[BaseException] = None  # the first failed bucket's error, for the trainer thread to raise
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # A daemon: a process leaving without the strategy's teardown must not wait for it.
        self._thread = threading.Thread(target=self._work, name="lightning-moo-ddp-hook", daemon=True)
        self._thread.start()

    @property
    def buckets(self):
        return self.reducer.buckets

    def start_step(self, step: int) -> None:
        self.reducer.start_step(step)

    def submit(self, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        future: torch.futures.Future[Tensor] = torch.futures.Future()
        self._queue.put((bucket, future))
        return future

    def _work(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # the current CUDA device is per thread
        while (item := self._queue.get()) is not None:
            bucket, future = item
            try:
                with torch.no_grad():  # as inside the backward, where the hook runs
                    result = self.reduce(bucket)
            except BaseException as error:  # a future left pending would hang DDP's backward
                # DDP's reducer cannot take an error through a Python future (it would fail to read
                # the exception as a tensor): hand it the bucket as it is and let ``raise_error``,
                # after the backward, raise the error itself. Every rank fails at the same bucket (its
                # Gram is all-reduced) and goes on with the later ones, so the collectives stay matched.
                if self.error is None:
                    self.error = error
                result = bucket.buffer()
            future.set_result(result)

    def raise_error(self) -> None:
        """Raise the error of a bucket of the last backward, if one failed (called once DDP's backward,
        which waits for every bucket, returned)."""
        error, self.error = self.error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Stop the worker thread once it has reduced what it was handed, and release the group."""
        if not self._thread.is_alive():
            return  # closed already
        self._queue.put(None)
        self._thread.join()
        dist.destroy_process_group(self.reducer.group)

    def reduce(self, bucket: dist.GradBucket) -> Tensor:
        tensor, index, group = bucket.buffer(), bucket.index(), self.reducer.group
        params, offset = [], 0
        for param in bucket.parameters():
            params.append(ParamRange(self.names.get(id(param), f"<unnamed param {index}.{len(params)}>"), offset, offset + param.numel()))
            offset += param.numel()
        slices = even_segments(tensor.numel(), dist.get_world_size(group))
        self.reducer.reduce(tensor, Bucket(index, tuple(params), tuple(slices)))
        if not self.reducer.exchange.fills_every_element:
            _gather_slices(tensor, slices, group)
        return tensor


def _moo_comm_hook(state: DDPBucketHook, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    return state.submit(bucket)


def _gather_slices(tensor: Tensor, slices: list[Segment], group) -> None:
    """Every rank's slice of ``tensor`` (rank r holds slice r) lands on every rank, in place: this
    rank sends its slice to every other rank and receives theirs into their slices, all in one
    batch of point-to-point operations. The same bytes as an all-gather, but no padding of the
    uneven slices to one length and no copies in and out (on gloo 2-4× faster than
    ``all_gather_into_tensor``), and the transfers run concurrently where a broadcast per slice
    runs them one after another."""
    rank, world = dist.get_rank(group), len(slices)
    mine = slices[rank]
    ops = []
    # Rank r sends to r + k while receiving from r - k: each pair's send meets its receive. A bucket
    # smaller than the world leaves some slices empty: nothing to move, on either side alike.
    for k in range(1, world):
        to, source = (rank + k) % world, (rank - k) % world
        if mine.length:
            ops.append(dist.P2POp(dist.isend, tensor[mine.start : mine.start + mine.length], group=group, group_peer=to))
        if (theirs := slices[source]).length:
            ops.append(dist.P2POp(dist.irecv, tensor[theirs.start : theirs.start + theirs.length], group=group, group_peer=source))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


class BucketMOODDPStrategy(LanguageLosses, SolverStateInCheckpoints, AtomicCheckpoints, DDPStrategy):
    """PyTorch DDP with one rank per language and a MOO solver per DDP gradient bucket.

    Rank t trains language t. Where DDP averages the languages' gradients of a bucket, a comm hook
    applies ``sum_t w_t g_t`` with ``w = solver(G)``, ``G`` the bucket's T×T Gram matrix.
    :attr:`buckets` shows what the last step actually solved.

    The buckets are DDP's own (``bucket_cap_mb``). Unless ``find_unused_parameters=True``, DDP's
    first step of every ``fit`` (a resumed one too) puts the whole model in one bucket, and only
    then rebuilds buckets of ``bucket_cap_mb`` in the order gradients became ready: that step is
    global MOO, and bucket indices change meaning after it (stateful solvers key their state by
    index). ``find_unused_parameters=True`` keeps one layout from the first step on.

    With ``accumulate_grad_batches > 1`` Lightning runs the micro-batches before the last under
    ``no_sync``, so the hook fires once per optimizer step, on each language's accumulated gradient.
    Under fp16 loss scaling a non-finite bucket makes the GradScaler skip the step, as in stock DDP;
    otherwise it raises ``FloatingPointError`` naming the bucket, step, parameters and languages.

    Args:
        solver: any :class:`~lightning_moo.solvers.MOOSolver`; default MGDA. ``Mean`` reproduces stock DDP.
        exchange: ``"sharded"`` (an all-to-all of slices, a sum of the T×T Grams over the ranks, an
            all-gather of the combined slices: the volume of DDP's all-reduce) or ``"allgather"``
            (every rank gathers every language's bucket; the reference).
        languages: number of languages (or their names); must equal the world size.
        target_buckets: about this many buckets per step: ``bucket_cap_mb`` becomes the trainable
            parameters' size divided by it (replacing any ``bucket_cap_mb`` given). A run with fewer
            than 4 buckets per step is warned about after its first rebuilt step.
        **kwargs: everything Lightning's ``DDPStrategy`` takes (``bucket_cap_mb``,
            ``find_unused_parameters``, ``gradient_as_bucket_view``, ``static_graph``, ...) except
            its own comm hooks and model averaging.
    """

    def __init__(
        self,
        solver: Optional[MOOSolver] = None,
        exchange: Literal["sharded", "allgather"] = "sharded",
        languages: Union[int, list[str], None] = None,
        target_buckets: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        conflicting = [name for name in _CONFLICTING if kwargs.get(name) is not None]
        if conflicting:
            raise MisconfigurationException(
                f"BucketMOODDPStrategy reduces every bucket through its own comm hook; {conflicting} would "
                "replace that hook or average gradients outside it. Remove them."
            )
        kwargs.setdefault("timeout", DEFAULT_TIMEOUT)
        super().__init__(**kwargs)
        self.solver = resolve_solver(solver)
        self.exchange = make_exchange(exchange)
        self.languages = languages
        self.target_buckets = target_buckets
        self._bucket_count_checked = False
        self.layout: Optional[LanguageLayout] = None  # known once the world size is
        self.hook: Optional[DDPBucketHook] = None
        self._init_language_losses()

    @property
    def buckets(self) -> dict[int, BucketInfo]:
        """Per bucket of the last step: parameter names and element ranges, Gram matrix, weights."""
        return self.hook.buckets if self.hook is not None else {}

    def setup_distributed(self) -> None:
        _compat.require_internals("ddp")
        self.set_world_ranks()
        count = self.world_size if self.languages is None else self.languages if isinstance(self.languages, int) else len(self.languages)
        if count != self.world_size:
            raise MisconfigurationException(
                f"BucketMOODDPStrategy trains one language per rank: {count} languages need world size "
                f"{count}, got {self.world_size} (devices × num_nodes). Set devices × num_nodes to "
                f"{count} or train {self.world_size} languages (or use BucketMOOStrategy, which also runs "
                "language groups and several languages per rank)."
            )
        self.layout = LanguageLayout.build(self.languages, self.world_size)
        super().setup_distributed()

    def _setup_model(self, model):
        if self.target_buckets is not None:
            element_size = next(p for p in model.parameters() if p.requires_grad).element_size()
            self._ddp_kwargs["bucket_cap_mb"] = bucket_numel_for(model, self.target_buckets) * element_size / 2**20
        return super()._setup_model(model)

    def _register_ddp_hooks(self) -> None:
        # Lightning registers comm hooks on CUDA only; DDP runs them on gloo as well.
        assert self.lightning_module is not None and self.model is not None and self.layout is not None
        if not self.solver.uses_gram:
            accumulation = self.lightning_module.trainer.accumulate_grad_batches
            if accumulation > 1:
                raise MisconfigurationException(
                    f"{type(self.solver).__name__} weighs each optimizer step's losses before the backward: use "
                    f"accumulate_grad_batches=1 (got {accumulation})."
                )
            return  # a loss weighting scales the losses; DDP averages the gradients the stock way
        names = {id(p): n for n, p in self.lightning_module.named_parameters()}
        scaler = isinstance(self.precision_plugin, MixedPrecision) and self.precision_plugin.scaler is not None
        # fp16 with a GradScaler: an overflow must reach the scaler, which skips the step.
        group = dist.new_group(timeout=self._timeout)  # the hook's worker thread's own (see DDPBucketHook)
        reducer = BucketReducer(self.solver, self.exchange, self.layout, "DDP", loss_scaling=scaler, group=group)
        self.hook = DDPBucketHook(reducer, names, self.root_device)
        self.model.register_comm_hook(self.hook, _moo_comm_hook)

    def backward(self, closure_loss: Tensor, optimizer, *args: Any, **kwargs: Any) -> Tensor:
        if self.solver.needs_losses:
            closure_loss = self._with_language_losses(closure_loss)
        loss = super().backward(closure_loss, optimizer, *args, **kwargs)
        if self.hook is not None:
            self.hook.raise_error()
        return loss

    def teardown(self) -> None:
        if self.hook is not None:
            self.hook.close()  # :attr:`buckets` stays readable
        super().teardown()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        # DDP's first step is one bucket (see above); its rebuilt buckets are known after the second.
        if self.hook is not None and self.lightning_module.trainer.global_step >= 2 and not self._bucket_count_checked:
            self._bucket_count_checked = True
            cap = self._ddp_kwargs.get("bucket_cap_mb", 25)
            warn_if_few_buckets(len(self.hook.buckets), self.lightning_module, f"bucket_cap_mb={cap}")
        if self.hook is not None:
            self.hook.start_step(self.lightning_module.trainer.global_step)
