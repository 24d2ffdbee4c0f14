"""Lightning strategies: stock DeepSpeed on any device, and bucket-level MOO inside DeepSpeed ZeRO."""

from .bucket_moo import BucketMOOStrategy
from .deepspeed import StockDeepSpeedStrategy

__all__ = ["BucketMOOStrategy", "StockDeepSpeedStrategy"]
