"""BucketMOOFSDPStrategy: FSDP2 (``fully_shard``) where every sharded unit's gradients are combined by a MOO solver.

Each ``fully_shard`` unit is one bucket. In the backward FSDP2 hands every unit's gradients to a
reduce-scatter: the input is this rank's (= its language's) unsharded gradients of the unit, laid out
rank-major (for rank r: every parameter's r-th dim-0 chunk, zero-padded to ``ceil(dim0 / N)`` rows),
and rank r keeps the r-th 1/N of it. :class:`FSDPUnitReduceScatter` replaces that collective
(``FSDPModule.set_custom_reduce_scatter``): it writes ``sum_t w_t g_t`` into this rank's shard instead
of the average. The exchange's even slices of the padded input are exactly FSDP's shards, so the
sharded exchange moves what a reduce-scatter moves plus one T×T Gram per parameter.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Literal, Optional, Union

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from ..buckets import Bucket, BucketInfo, ParamRange, even_segments
from ..exchange import make_exchange
from ..layout import LanguageLayout
from ..reducer import BucketReducer
from ..solvers import MOOSolver, resolve_solver
from .. import _compat
from .atomic import DEFAULT_TIMEOUT, AtomicCheckpoints
from .bucket_count import warn_if_few_buckets
from .language_losses import LanguageLosses
from .solver_state import SolverStateInCheckpoints

try:  # FSDP2 and its custom reduce-scatter (recent torch only)
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
except ImportError:  # pragma: no cover - refused in BucketMOOFSDPStrategy.__init__
    FSDPModule = None
    ReduceScatter = object


class FSDPUnitReduceScatter(ReduceScatter):
    """The reduce-scatter of one ``fully_shard`` unit, as a bucket reduction.

    FSDP calls it with the divide factor set to 1 (see :meth:`BucketMOOFSDPStrategy._install`), so
    nothing outside it scales the gradients and the shard it writes, ``sum_t w_t g_t``, is what the
    optimizer steps on (``Mean``: the average, as stock FSDP).
    """

    def __init__(self, unit: nn.Module, index: int, reducer: BucketReducer, names: dict[int, str]) -> None:
        (self.group,) = unit._get_fsdp_state()._fsdp_param_groups
        self.index, self.reducer, self.names = index, reducer, names

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: Tensor, input_tensor: Tensor, group, op, async_op: bool = False) -> None:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        pieces, params, numel = self._layout(world)
        if numel != input_tensor.numel() or world * output_tensor.numel() != numel:
            raise RuntimeError(
                f"FSDP bucket {self.index}: the reduce-scatter input ({input_tensor.numel()} elements for "
                f"{world} ranks) is not the rank-major padded layout of {[p.name for p in params]} this torch "
                "was expected to use; BucketMOOFSDPStrategy supports the installed torch's FSDP2 only if it is."
            )
        # Rank r keeps the r-th even slice: FSDP's shard, and the sharded exchange's own slice.
        owners = tuple(even_segments(numel, world))
        self.reducer.reduce(input_tensor, Bucket(self.index, tuple(pieces), owners))
        output_tensor.copy_(input_tensor.view(world, -1)[rank])
        self._record(params, world)

    def _layout(self, world: int) -> tuple[list[ParamRange], list[ParamRange], int]:
        """The gradients FSDP reduces here (every trainable parameter of the unit: unused ones are sent
        as zeros, see ``set_reduce_scatter_unused_params``): their real elements in the padded
        rank-major input, rank by rank; their ranges in the unit's unpadded flat gradient; the
        input's size."""
        trainable = [p for p in self.group.fsdp_params if p.sharded_param.requires_grad]
        rows = [-(-p._orig_size[0] // world) for p in trainable]  # ceil(dim0 / N): one rank's rows
        row_numel = [p._orig_size.numel() // max(p._orig_size[0], 1) for p in trainable]
        chunk = sum(r * e for r, e in zip(rows, row_numel))
        pieces, params, logical = [], [], 0
        for rank in range(world):
            offset = rank * chunk
            for p, r, e in zip(trainable, rows, row_numel):
                real = min(max(p._orig_size[0] - rank * r, 0), r)  # the last ranks' chunks are padding
                pieces.append(ParamRange(self.names[id(p.sharded_param)], offset, offset + real * e))
                offset += r * e
        for p in trainable:
            params.append(ParamRange(self.names[id(p.sharded_param)], logical, logical + p._orig_size.numel()))
            logical += p._orig_size.numel()
        return pieces, params, world * chunk

    def _record(self, params: list[ParamRange], world: int) -> None:
        """The record as the other strategies keep it: one range and Gram per parameter of the
        unpadded bucket (the pieces' Grams are summed over the ranks' chunks)."""
        info = self.reducer.buckets.get(self.index)
        if info is None:  # a skipped (overflowed) step records nothing
            return
        self.reducer.buckets[self.index] = info.per_parameter(tuple(params), world)


class FSDPBucketHook:
    """What the strategy keeps of its reduce-scatters: the reducer (for the language losses and the
    device check) and its records."""

    def __init__(self, reducer: BucketReducer) -> None:
        self.reducer = reducer

    @property
    def buckets(self) -> dict[int, BucketInfo]:
        return self.reducer.buckets


class BucketMOOFSDPStrategy(LanguageLosses, SolverStateInCheckpoints, AtomicCheckpoints, ModelParallelStrategy):
    """FSDP2 (Lightning's ``ModelParallelStrategy``, pure data parallelism over all ranks) with a MOO
    solver per ``fully_shard`` unit.

    Rank t trains language t, or ranks ``t·k … t·k + k - 1`` do (language groups: the solver
    combines the T language means). Where FSDP averages the languages' gradients of a unit, each
    rank's shard becomes ``sum_t w_t g_t`` with ``w = solver(G)``, ``G`` the unit's T×T Gram matrix.
    :attr:`buckets` shows what the last step solved, per unit: parameter names and element ranges
    of the unit's flat gradient, Grams, weights.

    The units: what ``LightningModule.configure_model`` applied ``fully_shard`` to (use
    ``self.device_mesh["data_parallel"]``), or else every submodule whose class is named in
    ``units`` (default: the model's ``_no_split_modules``, e.g. Hugging Face's decoder layers),
    then the whole module for the parameters left over.

    With ``accumulate_grad_batches > 1`` the micro-batches before the last skip the reduce-scatter
    (FSDP then keeps each language's unsharded gradient), so the solver sees each language's
    accumulated gradient once per step.

    Args:
        solver: any :class:`~lightning_moo.solvers.MOOSolver`; default MGDA. ``Mean`` reproduces stock FSDP.
        exchange: ``"sharded"`` (an all-to-all of the shards: a reduce-scatter's volume, plus one T×T
            Gram per parameter) or ``"allgather"`` (every rank gathers every language's unit; the reference).
        languages: number of languages T (or their names); N = T or N = k·T ranks.
        units: module class names to shard (and solve) one by one, when ``configure_model`` shards nothing.
        cpu_offload: FSDP2's ``CPUOffloadPolicy``: sharded parameters, gradients and optimizer state in
            host memory. The reduction is unchanged (FSDP moves the reduced shard to the host after it).
        reshard_after_forward: as ``fully_shard``'s (default: after every unit's forward but the root's).
        on_device: where a solver that can solve on the gradients' device does (see ``BucketMOOStrategy``).
        save_distributed_checkpoint, process_group_backend, timeout: as ``ModelParallelStrategy``'s (no
            ``data_parallel_size``/``tensor_parallel_size``: FSDP shards over all ranks, nothing else).
    """

    def __init__(
        self,
        solver: Optional[MOOSolver] = None,
        exchange: Literal["sharded", "allgather"] = "sharded",
        languages: Union[int, list[str], None] = None,
        units: Optional[list[str]] = None,
        cpu_offload: bool = False,
        reshard_after_forward: Optional[bool] = None,
        on_device: Optional[bool] = None,
        save_distributed_checkpoint: bool = True,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = DEFAULT_TIMEOUT,
    ) -> None:
        if FSDPModule is None or not hasattr(FSDPModule, "set_custom_reduce_scatter"):
            raise ImportError(
                f"BucketMOOFSDPStrategy needs FSDP2 with FSDPModule.set_custom_reduce_scatter, which torch "
                f"{torch.__version__} lacks. Upgrade torch, or use BucketMOOStrategy (DeepSpeed ZeRO)."
            )
        # Pure data parallelism over every rank (set in setup_environment): no tensor-parallel dimension.
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint, process_group_backend=process_group_backend, timeout=timeout
        )
        self.solver = resolve_solver(solver)
        self.exchange = make_exchange(exchange)
        self.languages, self.units = languages, units
        self.cpu_offload, self.reshard_after_forward, self.on_device = cpu_offload, reshard_after_forward, on_device
        self.layout: Optional[LanguageLayout] = None  # known once the world size is
        self.hook: Optional[FSDPBucketHook] = None
        self._bucket_count_checked = False
        self._init_language_losses()

    @property
    def buckets(self) -> dict[int, BucketInfo]:
        """Per ``fully_shard`` unit of the last step: parameter names and element ranges, Gram, weights."""
        return self.hook.buckets if self.hook is not None else {}

    def setup_environment(self) -> None:
        _compat.require_internals("fsdp")
        self.set_world_ranks()
        self.layout = LanguageLayout.build(self.languages, self.world_size)
        if self.layout.languages_per_rank > 1:
            raise MisconfigurationException(
                f"BucketMOOFSDPStrategy trains one language per rank or per group of ranks: {self.layout.num_languages} "
                f"languages on world size {self.world_size} would put {self.layout.languages_per_rank} on a rank, whose "
                f"gradients FSDP would sum before its reduce-scatter. Run {self.layout.num_languages} (or a multiple of "
                f"{self.layout.num_languages}) ranks, or use BucketMOOStrategy (DeepSpeed ZeRO), which keeps them apart."
            )
        # One data-parallel dimension over every rank: FSDP's reduce-scatter group is then the world in rank order.
        self._data_parallel_size, self._tensor_parallel_size = self.world_size, 1
        super().setup_environment()

    def setup(self, trainer) -> None:
        model = self.lightning_module
        if not any(isinstance(m, FSDPModule) for m in model.modules()):
            self._shard(model)
        self._check_units(model)
        # ModelParallelStrategy.setup insists on configure_model; it runs with the sharding done here.
        with _configure_model_overridden(model):
            super().setup(trainer)
        if trainer.training and self.solver.uses_gram:
            self._install(model)
        elif trainer.training and trainer.accumulate_grad_batches > 1:
            raise MisconfigurationException(
                f"{type(self.solver).__name__} weighs each optimizer step's losses before the backward: use "
                f"accumulate_grad_batches=1 (got {trainer.accumulate_grad_batches})."
            )

    def _shard(self, model: nn.Module) -> None:
        if self.units is not None:
            names = set(self.units)
        else:  # Hugging Face models name their transformer blocks here
            names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
        matched = [m for m in model.modules() if type(m).__name__ in names]
        if not matched:
            raise MisconfigurationException(
                f"BucketMOOFSDPStrategy found no module of the classes {sorted(names)} to shard: set strategy.units to "
                f"module class names of {type(model).__name__} (each becomes one bucket), or apply fully_shard in "
                "configure_model."
            )
        args = dict(mesh=self.device_mesh["data_parallel"], reshard_after_forward=self.reshard_after_forward)
        if self.cpu_offload:
            args["offload_policy"] = CPUOffloadPolicy(pin_memory=self.root_device.type == "cuda")
        for module in reversed(matched):  # inner units first: fully_shard takes every parameter not yet sharded
            fully_shard(module, **args)
        fully_shard(model, **args)

    def _check_units(self, model: nn.Module) -> None:
        """Refuse, before the first step, what would reduce a gradient outside the solver."""
        sharded = {id(p) for m in model.modules() if isinstance(m, FSDPModule) for p in _unit_params(m)}
        loose = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in sharded]
        if loose:
            raise MisconfigurationException(
                f"parameters {loose[:5]}{' …' if len(loose) > 5 else ''} belong to no fully_shard unit, so nothing "
                "would reduce their gradients: apply fully_shard to the whole module last in configure_model."
            )
        for m in model.modules():
            if not isinstance(m, FSDPModule):
                continue
            groups = m._get_fsdp_state()._fsdp_param_groups
            if len(groups) > 1:
                raise MisconfigurationException(
                    f"fully_shard unit {type(m).__name__} holds {len(groups)} parameter groups (shard_placement_fn with "
                    "several meshes), which FSDP reduces separately: one bucket needs one group. Drop shard_placement_fn."
                )
            for group in groups:
                mesh = group.mesh_info
                if type(mesh).__name__ != "FSDPMeshInfo" or mesh.shard_mesh_size != self.world_size:
                    raise MisconfigurationException(
                        f"fully_shard unit {type(m).__name__} uses {type(mesh).__name__} over {mesh.shard_mesh_size} of "
                        f"{self.world_size} ranks (hybrid sharding or replication): FSDP would all-reduce its gradients "
                        "outside the per-bucket solver. Shard every unit over self.device_mesh['data_parallel']."
                    )
                dims = {p.fsdp_placement.dim for p in group.fsdp_params}
                if dims != {0}:
                    raise MisconfigurationException(
                        f"fully_shard unit {type(m).__name__} shards parameters on dims {sorted(dims)}; the per-bucket "
                        "reduction reads FSDP's dim-0 layout only: drop shard_placement_fn."
                    )

    def _install(self, model: nn.Module) -> None:
        names = {id(p): n for n, p in model.named_parameters()}
        group = self.device_mesh["data_parallel"].get_group()
        # fp16 with a GradScaler: an overflow must reach the scaler, which skips the step.
        scaler = getattr(self.precision_plugin, "scaler", None) is not None
        reducer = BucketReducer(self.solver, self.exchange, self.layout, "FSDP", scaler, group, on_device=self.on_device)
        self.hook = FSDPBucketHook(reducer)
        # A unit without trainable parameters of its own (a root whose parameters all lie in inner
        # units, a frozen base layer) reduces nothing.
        units = [m for m in model.modules() if isinstance(m, FSDPModule) and any(p.requires_grad for p in _unit_params(m))]
        for index, unit in enumerate(units):
            unit.set_custom_reduce_scatter(FSDPUnitReduceScatter(unit, index, reducer, names))
            # No division outside the hook: it writes sum_t w_t g_t itself.
            unit.set_gradient_divide_factor(1.0)
            # Every trainable parameter in every reduction, so that all ranks lay the unit out alike
            # even when a language's batch leaves one unused.
            unit.set_reduce_scatter_unused_params(True)

    @contextmanager
    def block_backward_sync(self):
        """Micro-batches before the last keep their unsharded gradients (no reduce-scatter), so the
        solver sees each language's accumulated gradient."""
        units = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for unit in units:
                unit.set_requires_gradient_sync(True, recurse=False)

    def backward(self, closure_loss: Tensor, optimizer, *args: Any, **kwargs: Any) -> Tensor:
        if self.solver.needs_losses:
            closure_loss = self._with_language_losses(closure_loss)
        loss = super().backward(closure_loss, optimizer, *args, **kwargs)
        if self.hook is not None:
            self.hook.reducer.check_step()  # what was solved on the device, checked before the step
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self.hook is None:
            return
        if self.hook.buckets and not self._bucket_count_checked:
            self._bucket_count_checked = True
            warn_if_few_buckets(len(self.hook.buckets), self.lightning_module, "one bucket per fully_shard unit")
        self.hook.reducer.start_step(self.lightning_module.trainer.global_step)


def _unit_params(unit: nn.Module) -> list[Tensor]:
    return [p.sharded_param for group in unit._get_fsdp_state()._fsdp_param_groups for p in group.fsdp_params]


@contextmanager
def _configure_model_overridden(model: nn.Module):
    """Lightning's ``is_overridden("configure_model", model)`` is True inside (an instance attribute
    that does nothing: the model is sharded already and configure_model has run)."""
    own = "configure_model" in vars(model)
    if not own:
        model.configure_model = lambda: None
    try:
        yield
    finally:
        if not own:
            del model.configure_model
