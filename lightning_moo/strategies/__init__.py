"""Lightning strategies: stock DeepSpeed on any device, and bucket-level MOO inside DeepSpeed ZeRO."""

from .bucket_moo import BucketMOOStrategy
from .ddp import BucketMOODDPStrategy
from .deepspeed import StockDeepSpeedStrategy

__all__ = ["BucketMOODDPStrategy", "BucketMOOStrategy", "StockDeepSpeedStrategy"]
