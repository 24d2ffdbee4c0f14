"""Index samplers and batch assembly: a per-epoch shuffle that every rank and every resumed run
draws alike, exact evaluation shards, and the padding of encoded examples into a batch."""

from __future__ import annotations

import hashlib
from typing import Optional

import torch
from torch.utils.data import Sampler


def pad(rows: list[list[int]], value: int, width: Optional[int] = None) -> torch.Tensor:
    """Right-pads lists of ints with ``value`` to ``width`` (default: the longest) as a long tensor."""
    width = max(map(len, rows)) if width is None else width
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation every epoch from (seed, epoch, language), so every rank and every resumed
    run draws the same order. ``resume(epoch, samples)`` makes the next iteration of that epoch skip
    its first ``samples`` indices, which is how a run resumed mid-epoch continues where it stopped."""

    def __init__(self, size: int, seed: int, language: str, samples_per_epoch: Optional[int] = None,
                 replica: int = 0, replicas: int = 1):
        self.size, self.seed, self.language = size, seed, language
        # A language trained on k ranks: replica j of k takes every k-th index of the shared order.
        self.replica, self.replicas = replica, replicas
        # All ranks must run the same number of steps; a smaller epoch takes a new random subset each time.
        self.samples_per_epoch = size // replicas if samples_per_epoch is None else samples_per_epoch
        self.epoch = 0
        self._resume: Optional[tuple[int, int]] = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, samples: int) -> None:
        self._resume = (epoch, samples)

    def __len__(self) -> int:
        # The full epoch even when resuming: Lightning counts the consumed batches itself.
        return self.samples_per_epoch

    def __iter__(self):
        key = hashlib.sha256(f"{self.seed}/{self.epoch}/{self.language}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
        order = torch.randperm(self.size, generator=generator)[self.replica :: self.replicas]
        order = order[: self.samples_per_epoch].tolist()
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip, self._resume = self._resume[1], None
        yield from order[skip:]


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ...: every row on exactly one rank, no padding, so sums over ranks
    are exact totals."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.indices = range(rank, size, world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


class Collate:
    """Pads a list of encoded examples of one language into the batch dict of the contract
    (docs/data.md, "The batch contract")."""

    def __init__(self, pad_id: int, language: str):
        self.pad_id, self.language = pad_id, language

    def __call__(self, examples: list[dict]) -> dict:
        ids = [e["input_ids"] for e in examples]
        batch = {
            "input_ids": pad(ids, self.pad_id),
            "attention_mask": pad([[1] * len(x) for x in ids], 0),
            "labels": pad([e["labels"] for e in examples], -100),
            "num_bytes": torch.tensor([e["num_bytes"] for e in examples], dtype=torch.long),
            "language": self.language,
        }
        if "choices" in examples[0]:
            # Every example's choices padded to one width, so they stack into [B, C, Lc].
            width = max(len(c_ids) for e in examples for c_ids, _ in e["choices"])
            batch["choice_input_ids"] = torch.stack(
                [pad([c_ids for c_ids, _ in e["choices"]], self.pad_id, width) for e in examples]
            )
            batch["choice_attention_mask"] = torch.stack(
                [pad([[1] * len(c_ids) for c_ids, _ in e["choices"]], 0, width) for e in examples]
            )
            batch["choice_labels"] = torch.stack(
                [pad([c_labels for _, c_labels in e["choices"]], -100, width) for e in examples]
            )
            batch["label_index"] = torch.tensor([e["label_index"] for e in examples], dtype=torch.long)
        return batch
