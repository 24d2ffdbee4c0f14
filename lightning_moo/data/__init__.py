"""Multilingual data: rows from local files, the Hugging Face hub or a builtin offline corpus
(``sources``), tokenized with exact loss masks (``encoding``), served by loaders whose batches each
hold one language (``sampling``), all driven by :class:`MultilingualDataModule` (``datamodule``);
parallel sentences for the analysis callbacks (``parallel``).
See docs/data.md for the layouts, the batch contract and the errors."""

from .builtin import builtin_languages, builtin_root
from .datamodule import MultilingualDataModule
from .encoding import TRUNCATION, Encoder, required_columns
from .files import FORMATS, read_file
from .parallel import encode_batches, load_texts, read_parallel_texts
from .rows import STAGES, DataError, Row
from .sampling import Collate, EpochShuffleSampler, ShardSampler, pad
from .sources import (
    BuiltinSource,
    FilePerLanguage,
    HubSource,
    LanguageColumnFiles,
    Source,
    open_source,
)

__all__ = [
    "BuiltinSource",
    "Collate",
    "DataError",
    "Encoder",
    "EpochShuffleSampler",
    "FORMATS",
    "FilePerLanguage",
    "HubSource",
    "LanguageColumnFiles",
    "MultilingualDataModule",
    "Row",
    "STAGES",
    "ShardSampler",
    "Source",
    "TRUNCATION",
    "builtin_languages",
    "builtin_root",
    "encode_batches",
    "load_texts",
    "open_source",
    "pad",
    "read_file",
    "read_parallel_texts",
    "required_columns",
]
