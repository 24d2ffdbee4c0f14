"""Which rank trains which language: one frozen answer that every part of a run asks.

T languages run on N ranks in one of three shapes, all contiguous in rank order:

- one language per rank (N = T): rank t trains language t;
- language groups (N = k·T): ranks ``t·k … t·k + k - 1`` train language t, each on its own share of
  the language's data (replica ``r % k``);
- several languages per rank (T = m·N, down to one process): rank r trains languages
  ``r·m … r·m + m - 1``.

The strategy builds the layout when it knows the world size and hands it to the exchange, the
bucket reducer, the DataModule and the module; nothing recomputes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor


class LayoutError(MisconfigurationException, ValueError):
    """The languages do not fit the world size; the message names both and the fix."""


@dataclass(frozen=True)
class LanguageLayout:
    """T named languages on ``world_size`` ranks. Build it with :meth:`build`, which checks the shape."""

    names: tuple[str, ...]
    world_size: int

    @classmethod
    def build(cls, languages: Union[int, Sequence[str], None], world_size: int, what: Optional[str] = None) -> "LanguageLayout":
        """The layout of ``languages`` (a count, names, or None for one per rank) on ``world_size`` ranks.

        ``what`` names the languages in error messages (default "T languages"). Raises
        :class:`LayoutError` when neither T divides N nor N divides T.
        """
        if languages is None:
            languages = world_size
        names = tuple(str(t) for t in range(languages)) if isinstance(languages, int) else tuple(str(n) for n in languages)
        count, world = len(names), int(world_size)
        if count < 1 or world < 1:
            raise LayoutError(f"a layout needs at least one language and one rank, got {count} languages on world size {world}")
        if len(set(names)) != count:
            repeated = sorted({n for n in names if names.count(n) > 1})
            raise LayoutError(f"languages {list(names)} name {repeated} more than once; each language is one objective")
        what = what or f"{count} languages"
        if count >= world and count % world:
            raise LayoutError(
                f"{what} do not split over world size {world} (devices × num_nodes): every rank trains the same "
                f"number of languages. Use a world size that divides {count} (e.g. 1 or {count}), or train a "
                f"multiple of {world} languages."
            )
        if count < world and world % count:
            raise LayoutError(
                f"world size {world} is not a multiple of {what} (world size = devices × num_nodes), nor a divisor "
                f"of it: run k × {count} processes (k ranks per language, e.g. {count} or {2 * count}) or a number "
                f"of processes that divides {count}, or train {world} languages."
            )
        return cls(names, world)

    # ----- the shape -----

    @property
    def num_languages(self) -> int:
        return len(self.names)

    @property
    def ranks_per_language(self) -> int:
        """k: how many ranks share one language (1 unless N > T)."""
        return max(self.world_size // self.num_languages, 1)

    @property
    def languages_per_rank(self) -> int:
        """m: how many languages one rank trains (1 unless T > N)."""
        return max(self.num_languages // self.world_size, 1)

    @property
    def rows(self) -> int:
        """R = max(N, T): the gradients a bucket's exchange gathers, one per (rank, language) pair."""
        return self.world_size * self.languages_per_rank

    # ----- the questions -----

    def languages_of(self, rank: int) -> tuple[int, ...]:
        """The languages rank ``rank`` trains, in the order its gradients are stacked."""
        self._check_rank(rank)
        first = rank // self.ranks_per_language * self.languages_per_rank
        return tuple(range(first, first + self.languages_per_rank))

    def ranks_of(self, language: Union[int, str]) -> tuple[int, ...]:
        """The ranks that train ``language`` (an index or a name)."""
        t = self.index(language)
        k, m = self.ranks_per_language, self.languages_per_rank
        first = t // m * k
        return tuple(range(first, first + k))

    def rows_of(self, language: Union[int, str]) -> tuple[int, ...]:
        """Where ``language``'s gradients (or losses) sit among the R rows that ranks gather in rank
        order, each rank's languages in order."""
        t, m = self.index(language), self.languages_per_rank
        return tuple(r * m + self.languages_of(r).index(t) for r in self.ranks_of(t))

    def replica_of(self, rank: int) -> int:
        """Which of its language's k ranks ``rank`` is (0 … k - 1): its share of that language's data."""
        self._check_rank(rank)
        return rank % self.ranks_per_language

    def index(self, language: Union[int, str]) -> int:
        if isinstance(language, int):
            if not 0 <= language < self.num_languages:
                raise IndexError(f"language {language} is out of range for {self.num_languages} languages")
            return language
        try:
            return self.names.index(language)
        except ValueError:
            raise KeyError(f"{language!r} is not one of the languages {list(self.names)}") from None

    def describe(self, rank: int) -> str:
        """A rank in words, for messages: "language hin", "rank 3 (language hin, replica 2 of 2)",
        "rank 1 (languages deu, rus)"."""
        languages = [self.names[t] for t in self.languages_of(rank)]
        if self.languages_per_rank > 1:
            return f"rank {rank} (languages {', '.join(languages)})"
        if self.ranks_per_language > 1:
            return f"rank {rank} (language {languages[0]}, replica {self.replica_of(rank) + 1} of {self.ranks_per_language})"
        return f"language {languages[0]}"

    # ----- what the layout means for a bucket's Gram and weights -----

    def language_grams(self, grams: Tensor) -> Tensor:
        """``[..., R, R]`` Grams of the gathered rows -> ``[..., T, T]`` Grams of the language means.

        Rows are in rank order, each rank's languages in order, so row ``i`` belongs to language
        ``i // k`` (k ranks per language; with m languages per rank k = 1 and row i is language i).
        The mean of a language's k rows is ``A g`` with ``A`` the averaging matrix: ``A G Aᵀ``.
        """
        k = self.ranks_per_language
        if k == 1:
            return grams
        *lead, n, _ = grams.shape
        t = n // k
        return grams.reshape(*lead, t, k, t, k).sum((-3, -1)) / (k * k)

    def row_weights(self, w: Tensor) -> Tensor:
        """The solver's T language weights as weights of the R gathered rows: ``w_t / k`` for each of
        language t's k ranks, so ``Mean`` stays the plain average over all ranks."""
        k = self.ranks_per_language
        return w if k == 1 else w.repeat_interleave(k) / k

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise IndexError(f"rank {rank} is out of range for world size {self.world_size}")
