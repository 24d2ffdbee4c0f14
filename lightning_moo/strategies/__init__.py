"""Lightning strategies: stock DeepSpeed on any device, and bucket-level MOO inside DeepSpeed ZeRO-1/2/3,
DDP and FSDP2."""

from .bucket_moo import BucketMOOStrategy
from .ddp import BucketMOODDPStrategy
from .deepspeed import StockDeepSpeedStrategy
from .fsdp import BucketMOOFSDPStrategy

__all__ = ["BucketMOODDPStrategy", "BucketMOOFSDPStrategy", "BucketMOOStrategy", "StockDeepSpeedStrategy"]
