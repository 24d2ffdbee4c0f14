"""Lightning's DeepSpeedStrategy, unchanged in what it computes, but also on CPU (gloo)."""

from __future__ import annotations

import argparse

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch.nn import Module

from .. import _compat
from ..adapters import check_deepspeed_checkpoint


class StockDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeed ZeRO with stock gradient averaging, usable on CPU for tests, demos and baselines.

    Lightning refuses DeepSpeed without CUDA in three places; on CUDA this class behaves exactly
    like ``DeepSpeedStrategy``.
    """

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
