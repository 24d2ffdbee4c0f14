"""Every private DeepSpeed and Lightning internal this package relies on, in one place.

Written against torch 2.13.0, deepspeed 0.19.8 and lightning 2.6.6. Each use below says why it is
needed. A new release may rename or reshape any of them without notice, so :func:`check_internals`
inspects the installed versions for each one and :func:`require_internals` refuses to start a
strategy (naming what changed and what to do) instead of letting it silently reduce gradients the
stock way; each strategy checks only what it and the shared callbacks use. tests/test_compat.py
runs the check in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

WRITTEN_AGAINST = {"torch": "2.13.0", "deepspeed": "0.19.8", "lightning": "2.6.6"}
FIX = (
    "lightning_moo was written against torch {torch}, deepspeed {deepspeed} and lightning {lightning}: install those "
    "versions, or update lightning_moo/_compat.py for the installed ones"
)


@dataclass(frozen=True)
class Internal:
    """One private name: where it lives, what must be true of it, and why we use it."""

    owner: str  # "module:Class" or "module"
    name: Optional[str]  # None: the owner itself
    why: str
    # Parameter names the callable must have, or source fragments the owner must contain.
    parameters: Optional[tuple[str, ...]] = None
    source_has: tuple[str, ...] = ()
    # Which strategy needs it ("deepspeed", "fsdp", "ddp"), or "any" for the shared callbacks and
    # collectives: a DeepSpeed run must not be refused because torch reshaped FSDP's internals.
    used_by: str = "any"


STRATEGIES = ("deepspeed", "fsdp", "ddp")
ZERO = "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer"
ZERO3 = "deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3"
INTERNALS = (
    Internal(ZERO, "average_tensor", "the per-bucket reduction of ZeRO-1/2: the hook replaces it per optimizer",
             parameters=("self", "tensor", "communication_data_type"), used_by="deepspeed"),
    Internal(ZERO, "_add_full_reduction_to_compact_grad_partition",
             "bf16 with fp32 gradient accumulation keeps reduced gradients in a separate fp32 partition; "
             "stock average_tensor fills it from the reduced bucket, so the hook must too",
             parameters=("self", "reduced_tensor", "communication_data_type"), used_by="deepspeed"),
    Internal(ZERO, "__init__", "the bucket's parameters and which rank owns which of their elements",
             source_has=("self.ipg_buckets", "self.bit16_groups", "self.grad_start_offset", "self.param_to_partition_ids",
                         "self.dp_process_group", "self.overlap_comm", "self.reduction_stream", "self.dynamic_loss_scale"),
             used_by="deepspeed"),
    Internal("deepspeed.runtime.zero.stage_1_and_2:IPGBucket", None, "a bucket's parameters, MoE flag and copy streams",
             source_has=("params", "has_moe_params", "copy_streams"), used_by="deepspeed"),
    Internal(ZERO3, "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads",
             "ZeRO-3's reduce-scatter of one bucket's full gradients into this rank's partitions: the hook replaces it",
             parameters=("self", "params_to_reduce", "communication_data_type"), used_by="deepspeed"),
    Internal(ZERO3, "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_contiguous_grads",
             "ZeRO-3's all-reduce variant of the same (reduce_scatter=false): the hook replaces it too",
             parameters=("self", "buffer_to_reduce", "communication_data_type"), used_by="deepspeed"),
    Internal(ZERO3, "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads",
             "calls one of the two above per bucket, with the bucket's parameters in ipg_buckets, and keeps what "
             "they return as each parameter's partition",
             source_has=("self.__avg_scatter_contiguous_grads(grad_bucket, communication_data_type)",
                         "self.__avg_scatter_grads(params_in_bucket, communication_data_type)",
                         "self.partition_grads(params_in_bucket, grad_partitions)"), used_by="deepspeed"),
    Internal(ZERO3, "__init__", "the optimizer's data-parallel group, loss scaling and accumulation dtype",
             source_has=("self.dp_process_group", "self.ipg_buckets", "self.gradient_accumulation_dtype",
                         "self.all2all_process_group"), used_by="deepspeed"),
    Internal("torch.distributed.fsdp._fully_shard._fully_shard:FSDPModule", "_get_fsdp_state",
             "BucketMOOFSDPStrategy reads each fully_shard unit's parameter group to describe its bucket",
             parameters=("self",), used_by="fsdp"),
    Internal("torch.distributed.fsdp._fully_shard._fsdp_state:FSDPState", "__init__",
             "a unit's parameter groups (one bucket needs one)", source_has=("self._fsdp_param_groups",),
             used_by="fsdp"),
    Internal("torch.distributed.fsdp._fully_shard._fsdp_param_group:FSDPParamGroup", "__init__",
             "a group's parameters and the mesh it shards over (hybrid sharding is refused)",
             source_has=("self.fsdp_params", "self.mesh_info"), used_by="fsdp"),
    Internal("torch.distributed.fsdp._fully_shard._fsdp_param:FSDPParam", "_init_sharded_param",
             "each parameter's unsharded size, shard dim and sharded parameter: the rank-major padded layout of "
             "the reduce-scatter input", source_has=("self._orig_size = ", "self.fsdp_placement", "self.sharded_param"),
             used_by="fsdp"),
    Internal("torch.distributed.fsdp._fully_shard._fsdp_common:FSDPMeshInfo", "__post_init__",
             "how many ranks a unit shards over", source_has=("self.shard_mesh_size",), used_by="fsdp"),
    Internal("deepspeed.runtime.engine:DeepSpeedEngine", "_backward_prologue",
             "a backward through the engine's outputs starts it and queues the reduction: shadowing it keeps an "
             "extra autograd pass (stashed or global gradients) invisible to DeepSpeed", parameters=("self",),
             used_by="deepspeed"),
    Internal("deepspeed.ops", None,
             "DeepSpeed compiles a CPU shared-memory op with g++ on first start (about a minute) that training "
             "never uses; marking it incompatible skips the build", source_has=("__compatible_ops__",),
             used_by="deepspeed"),
    Internal("lightning.pytorch.strategies.deepspeed:DeepSpeedStrategy", "_setup_model_and_optimizer",
             "calls deepspeed.initialize with device_rank=root_device.index, which is None on CPU",
             parameters=("self", "model", "optimizer", "lr_scheduler"), used_by="deepspeed"),
    Internal("lightning.pytorch.strategies.deepspeed:DeepSpeedStrategy", "_initialize_deepspeed_inference",
             "validate/test/predict: the same device_rank=None problem, inside a method we only wrap",
             parameters=("self", "model"), source_has=("deepspeed.initialize(", "device_rank=self.root_device.index"),
             used_by="deepspeed"),
    Internal("lightning.pytorch.strategies.deepspeed:DeepSpeedStrategy", "_init_deepspeed_distributed",
             "the part of setup_distributed that follows Lightning's CUDA device-index check, which CPU skips",
             parameters=("self",), used_by="deepspeed"),
    Internal("lightning.pytorch.strategies.ddp:DDPStrategy", "_register_ddp_hooks",
             "Lightning registers DDP comm hooks on CUDA only; the DDP strategy registers its own on any device",
             parameters=("self",), used_by="ddp"),
    Internal("lightning.pytorch.strategies.launchers.subprocess_script", "_launch_process_observer",
             "Lightning's watcher of the launcher's child ranks SIGKILLs every rank, saying nothing, when one fails: "
             "lightning_moo.faults puts a watcher in its place that first says which rank failed and why",
             parameters=("child_processes",)),
    Internal("lightning.pytorch.trainer.connectors.signal_connector:_SignalConnector", "_sigterm_notifier_fn",
             "Lightning's SIGTERM handler runs a collective inside the handler (deadlock when ranks get different "
             "numbers of signals); the Preemption callback replaces the handler after Lightning installs it",
             source_has=("dist.broadcast",)),
    Internal("torch.distributed.distributed_c10d", "_set_pg_timeout",
             "DeepSpeed makes its own process groups with PyTorch's 30-minute default timeout, whatever the world "
             "group's: the strategies' timeout is set on every group", parameters=("timeout", "group")),
    Internal("torch.distributed.distributed_c10d", None, "every process group of this process",
             source_has=("_world = _World()", "def pg_map")),
    Internal("lightning.pytorch.trainer.connectors.accelerator_connector:_AcceleratorConnector", "__init__",
             "the DataModule shards its own data per language and must know whether Lightning would re-shard it",
             source_has=("self.use_distributed_sampler",)),
)


def _resolve(owner: str):
    module, _, cls = owner.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, cls) if cls else obj


def _undecorated(target):
    """DeepSpeed's ``instrument_w_nvtx`` wraps a method in ``wrapped_fn(*args, **kwargs)`` without
    ``functools.wraps``: the method itself is the function in its closure."""
    while getattr(target, "__name__", None) == "wrapped_fn" and getattr(target, "__closure__", None):
        inner = [c.cell_contents for c in target.__closure__ if inspect.isfunction(c.cell_contents)]
        if len(inner) != 1:
            break
        target = inner[0]
    return inspect.unwrap(target) if callable(target) else target


def check_internals(internals: Optional[tuple[Internal, ...]] = None) -> list[str]:
    """One message per internal that the installed versions no longer provide as expected."""
    problems = []
    for item in INTERNALS if internals is None else internals:
        where = item.owner.replace(":", ".") + (f".{item.name}" if item.name else "")
        try:
            owner = _resolve(item.owner)
            target = owner if item.name is None else _undecorated(inspect.getattr_static(owner, item.name))
        except (ImportError, AttributeError) as error:
            problems.append(f"{where} is gone ({error}); used because {item.why}")
            continue
        if item.parameters is not None:
            found = tuple(inspect.signature(target).parameters)
            if found[: len(item.parameters)] != item.parameters:
                problems.append(f"{where} now takes {found}, expected {item.parameters}; used because {item.why}")
        if item.source_has:
            source = inspect.getsource(target)
            missing = [s for s in item.source_has if s not in source]
            if missing:
                problems.append(f"{where} no longer mentions {missing}; used because {item.why}")
    return problems


def require_internals(strategy: str) -> None:
    """Raise before the first step if an internal that ``strategy`` ("deepspeed", "fsdp" or "ddp") or
    the shared callbacks hook into has changed."""
    if strategy not in STRATEGIES:  # a misspelt name would check only the shared internals
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    problems = check_internals(tuple(item for item in INTERNALS if item.used_by in (strategy, "any")))
    if problems:
        raise RuntimeError(
            "the installed versions changed internals lightning_moo hooks into, so bucket-level MOO would not "
            "run as tested:\n- " + "\n- ".join(problems) + "\n" + FIX.format(**WRITTEN_AGAINST)
        )


# ----- DeepSpeed ZeRO-1/2 -----------------------------------------------------------------------


def install_bucket_reduction(optimizer, reduce: Callable[[Tensor, torch.dtype], None]) -> None:
    """Make ``optimizer`` call ``reduce(tensor, communication_data_type)`` where it averages a bucket."""
    optimizer.average_tensor = reduce


def install_stage3_bucket_reduction(optimizer, hook) -> None:
    """Make ZeRO-3 call ``hook.scatter(params, communication_data_type, padded)`` for each bucket's partitions:
    both private methods are name-mangled, so an instance attribute of the mangled name shadows them."""
    optimizer._DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads = (
        lambda params, comm_dtype: hook.scatter(params, comm_dtype, padded=False))
    # The all-reduce variant pads each partition to its full size; its buffer holds the bucket's
    # gradients in ipg_buckets' order, which the hook reads from the parameters instead.
    optimizer._DeepSpeedZeroOptimizer_Stage3__avg_scatter_contiguous_grads = (
        lambda buffer, comm_dtype: hook.scatter(optimizer.ipg_buckets[comm_dtype].params, comm_dtype, padded=True))


def zero_bucket(optimizer, comm_dtype: torch.dtype) -> list[tuple[Tensor, list[tuple[int, int]]]]:
    """The bucket ``optimizer`` is about to reduce: each parameter, in order, with its ownership as
    ``(start within the parameter, owner rank)`` pairs sorted by start (``grad_start_offset``: a
    parameter that straddles partitions is split at each partition's start)."""
    bucket = optimizer.ipg_buckets[comm_dtype]
    if bucket.has_moe_params:
        raise NotImplementedError("bucket-level MOO does not support mixture-of-experts parameter groups")
    out = []
    for group, index, param_id in bucket.params:
        owners = sorted(
            (int(optimizer.grad_start_offset[group][pid][param_id]), int(pid))
            for pid in optimizer.param_to_partition_ids[group][param_id]
        )
        out.append((optimizer.bit16_groups[group][index], owners))
    return out


def add_full_reduction_to_partition(optimizer, tensor: Tensor, comm_dtype: torch.dtype) -> None:
    """What stock ``average_tensor`` does last: bf16 params with fp32 gradient accumulation copy the
    reduced bucket into their fp32 gradient partition (a no-op otherwise)."""
    optimizer._add_full_reduction_to_compact_grad_partition(tensor, comm_dtype)


def reduction_stream(optimizer, comm_dtype: torch.dtype):
    """The stream stock ``average_tensor`` reduces on, after the same waits (a no-op on CPU)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if not optimizer.overlap_comm:
        return acc.stream(acc.current_stream())
    stream = optimizer.reduction_stream
    if not acc.resolves_data_dependency():
        bucket = optimizer.ipg_buckets[comm_dtype]
        for producer in bucket.copy_streams or {acc.current_stream()}:
            stream.wait_stream(producer)
        acc.current_stream().wait_stream(stream)
    return acc.stream(stream)


@contextlib.contextmanager
def invisible_to_engine(engine) -> Iterator[None]:
    """An autograd pass inside this block starts no DeepSpeed backward prologue (so no reduction is
    queued); parameter hooks fire only on ``.grad`` accumulation, which ``autograd.grad`` skips."""
    engine._backward_prologue = lambda: None
    try:
        yield
    finally:
        del engine._backward_prologue


def skip_shm_comm_build() -> None:
    """DeepSpeed's CPU shared-memory op serves only inference_all_reduce; do not compile it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


@contextlib.contextmanager
def deepspeed_initialize_with_device_rank(device_rank: int) -> Iterator[None]:
    """Within the block, ``deepspeed.initialize`` gets ``args.device_rank = device_rank`` whatever the
    caller passed: Lightning's inference setup passes ``root_device.index``, None on CPU."""
    import deepspeed

    initialize = deepspeed.initialize
    deepspeed.initialize = lambda args=None, **kwargs: initialize(args=argparse.Namespace(device_rank=device_rank), **kwargs)
    try:
        yield
    finally:
        deepspeed.initialize = initialize


# ----- Lightning ---------------------------------------------------------------------------------


def uses_distributed_sampler(trainer) -> bool:
    """Whether Lightning will wrap the DataModule's samplers in a DistributedSampler."""
    return bool(trainer._accelerator_connector.use_distributed_sampler)


def report_failed_ranks(watch: Callable) -> None:
    """Let ``watch(child_processes, main_pid)`` watch the child ranks Lightning's launcher starts."""
    from lightning.pytorch.strategies.launchers import subprocess_script

    subprocess_script._launch_process_observer = watch


def set_collective_timeout(timeout) -> None:
    """Give every process group of this process ``timeout`` (a ``timedelta``)."""
    from torch.distributed import distributed_c10d

    for group in list(distributed_c10d._world.pg_map):
        distributed_c10d._set_pg_timeout(timeout, group)
