"""lightning_moo: conflict-aware multilingual fine-tuning with bucket-level multi-objective optimization."""

__version__ = "0.1.0"
