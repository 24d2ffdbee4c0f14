"""A tiny multilingual regression problem, identical in the workers and in the test process.

Languages map inputs to nearly opposite targets, so their gradients conflict.
Everything is a pure function of (language, step), so any process can replay any batch.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn

IN, HIDDEN, OUT, BATCH = 8, 32, 4, 16


def make_net(lora: bool = False) -> nn.Module:
    """The toy net; with ``lora`` its three linear layers are frozen and carry rank-2 LoRA adapters
    (peft's own layers), whose B matrices start random so that every adapter weight gets a gradient
    from the first step (peft starts B at zero: A's gradient would be zero at step 0)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))
    if not lora:
        return net
    from peft import LoraConfig, inject_adapter_in_model

    net = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2", "4"]), net)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    return net


def batch(language: int, step: int, replica: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Language ``language``'s batch of ``step``; ``replica`` j > 0 draws other inputs of the same
    language (the j-th rank of a language group)."""
    # Opposite targets plus a language-specific part: the languages' gradients conflict.
    gen = torch.Generator().manual_seed(1)
    shared = torch.randn(IN, OUT, generator=gen)
    gen.manual_seed(1000 * language + 2)
    target_map = (-1) ** language * shared + 0.5 * torch.randn(IN, OUT, generator=gen)
    gen.manual_seed(1_000_003 * (step + 1) + language + 7919 * replica)
    x = torch.randn(BATCH, IN, generator=gen)
    return x, torch.tanh(x @ target_map)


def loss_fn(net: nn.Module, language: int, step: int, replica: int = 0) -> torch.Tensor:
    x, y = batch(language, step, replica)
    return nn.functional.mse_loss(net(x), y)


class ToyModule(pl.LightningModule):
    """Rank r trains language r; micro-batch ``i`` of the run is ``batch(r, i)``."""

    def __init__(self, language: int | list[int], optimizer: str = "sgd", lr: float = 0.1, replica: int = 0,
                 lora: bool = False) -> None:
        super().__init__()
        self.net = make_net(lora)
        self.language, self.optimizer_name, self.lr, self.replica = language, optimizer, lr, replica

    def training_step(self, _, batch_idx):
        # From the trainer's counters rather than the data, so a resumed run continues the sequence.
        accumulate = self.trainer.accumulate_grad_batches
        micro_step = self.trainer.global_step * accumulate + batch_idx % accumulate
        if isinstance(self.language, list):
            # Several languages on this rank: all but the last are stashed, the last is backpropagated.
            *first, last = self.language
            for language in first:
                self.trainer.strategy.stash_gradient(self.loss(language, micro_step))
            return self.loss(last, micro_step)
        return self.loss(self.language, micro_step)

    def loss(self, language: int, micro_step: int) -> torch.Tensor:
        x, y = batch(language, micro_step, self.replica)
        dtype = next(self.net.parameters()).dtype  # bf16 when DeepSpeed runs the model in bf16
        return nn.functional.mse_loss(self.net(x.to(dtype)).float(), y)

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "adam":
            return torch.optim.Adam(trainable, lr=self.lr)
        return torch.optim.SGD(trainable, lr=self.lr)


def named_params(net: nn.Module) -> dict[str, torch.Tensor]:
    return {f"net.{n}": p.detach().clone() for n, p in net.named_parameters()}
