"""Lightning's DeepSpeedStrategy, unchanged in what it computes, but also on CPU (gloo)."""

from __future__ import annotations

import argparse
from typing import Any

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch.nn import Module

from .. import _compat
from ..adapters import check_deepspeed_checkpoint
from .atomic import DEFAULT_TIMEOUT, AtomicCheckpoints


class StockDeepSpeedStrategy(AtomicCheckpoints, DeepSpeedStrategy):
    """DeepSpeed ZeRO with stock gradient averaging, usable on CPU for tests, demos and baselines.

    Lightning refuses DeepSpeed without CUDA in three places; on CUDA this class behaves exactly
    like ``DeepSpeedStrategy`` in what it computes. Checkpoints are written aside and renamed into
    place (:class:`AtomicCheckpoints`), and collectives give up on a silent rank after 10 minutes
    (``timeout``, PyTorch's default is 30).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("timeout", DEFAULT_TIMEOUT)
        super().__init__(*args, **kwargs)

    def setup_environment(self) -> None:
        if self.root_device.type == "cuda":
            super().setup_environment()
            return
        # Skip DeepSpeedStrategy's CUDA-only check, keep everything its parents do.
        super(DeepSpeedStrategy, self).setup_environment()

    def setup_distributed(self) -> None:
        if self.root_device.type == "cuda":
            super().setup_distributed()
            return
        # The parent validates CUDA device indices first; the rest is the same.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _init_deepspeed_distributed(self) -> None:
        if self.root_device.type == "cpu":
            _compat.skip_shm_comm_build()
        super()._init_deepspeed_distributed()

    def init_deepspeed(self) -> None:
        super().init_deepspeed()
        # DeepSpeed's own groups (the data-parallel one reduces every bucket) keep PyTorch's 30 minutes.
        if self._timeout is not None:
            _compat.set_collective_timeout(self._timeout)

    def _setup_model_and_optimizer(self, model: Module, optimizer, lr_scheduler=None):
        import deepspeed

        model_parameters = filter(lambda p: p.requires_grad, model.parameters())
        # root_device.index is None on CPU; DeepSpeed wants a number.
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank if self.root_device.index is None else self.root_device.index),
            config=self.config,
            model=model,
            model_parameters=model_parameters,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        # An adapter checkpoint resumed with another adapter config fails here with the fix, not
        # inside DeepSpeed's optimizer-state loading.
        check_deepspeed_checkpoint(checkpoint_path, self.lightning_module)
        return super().load_checkpoint(checkpoint_path, weights_only)

    def _initialize_deepspeed_inference(self, model: Module) -> None:
        if self.root_device.index is not None:
            super()._initialize_deepspeed_inference(model)
            return
        # validate/test/predict: Lightning passes device_rank=root_device.index, None on CPU. Keep its
        # inference config and only supply the rank, for the duration of this one call.
        with _compat.deepspeed_initialize_with_device_rank(self.local_rank):
            super()._initialize_deepspeed_inference(model)
