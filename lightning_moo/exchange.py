"""How the T languages' gradients of one bucket meet: two exchanges behind one interface.

Rank t holds language t's flat gradient of a bucket. An exchange replaces the elements this rank
owns (see :class:`~lightning_moo.buckets.Segment`) by ``sum_t w_t g_t``, where ``w = solve(G)``
and ``G`` is the T×T Gram matrix of the bucket's T gradients. Every rank sees the same ``G`` and
``w``. Elements owned by other ranks may be left as they were: DeepSpeed keeps only its own
partition of a reduced bucket.

- :class:`AllGatherExchange` (the paper's way, the reference): every rank gathers the whole bucket
  of every language, so it sends (T-1)× the bucket and holds T buckets at once.
- :class:`ShardedExchange` (default): an all-to-all hands rank r the r-th 1/N slice of the bucket
  from every language (the volume of a reduce-scatter), partial Grams (T×T numbers) are summed
  over the ranks, rank r combines its slice, and a second all-to-all sends the combined elements
  to the ranks that own them (at most 1/N of the bucket). Together no more than the all-reduce
  of stock data parallelism; a reused workspace of about 1 + 1/N buckets; the work is balanced
  over the ranks.
  Inner products split over disjoint slices, so ``G`` is the same up to rounding.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .buckets import Segment, even_segments
from .gram import combine, gram, piece_grams
from .layout import LanguageLayout

Solve = Callable[[Tensor], Tensor]


class PieceRows:
    """A rank's gradient rows of one bucket (one per language it trains), kept as the pieces they
    were computed in: ``rows[i]`` lists ``(start, flat tensor)`` pieces that tile ``[0, n)`` in order.

    A rank with several languages stashes each language's gradient parameter by parameter; the
    exchange copies those pieces straight into what it sends, instead of first assembling every
    row of the bucket (each such copy of m × n elements measured as much as the reduction's own
    communication on CPU).
    """

    def __init__(self, rows: list[list[tuple[int, Tensor]]]) -> None:
        self.rows = rows

    @classmethod
    def of(cls, tensor: Tensor, others: "PieceRows | Tensor | None" = None) -> "PieceRows":
        """``others``' rows (a PieceRows or an [m - 1, n] tensor), then ``tensor``: language order."""
        if others is None:
            first: list[list[tuple[int, Tensor]]] = []
        elif isinstance(others, PieceRows):
            first = others.rows
        else:
            first = [[(0, row)] for row in others]
        return cls(first + [[(0, tensor.view(-1))]])

    def __len__(self) -> int:
        return len(self.rows)

    def write(self, out: Tensor, start: int, end: int) -> Tensor:
        """Write every row's elements ``[start, end)``, row after row, to the front of the flat ``out``
        (in its dtype and device); return the part written.

        Pieces of another dtype (bf16 gradients stashed for an fp32 bucket) are converted by the copy
        into ``out`` itself: converting them first and then concatenating would write and read the
        converted rows once more (on a GPU, memory traffic of the size of the stash).
        """
        views = []
        for row in self.rows:
            for offset, piece in row:
                lo, hi = max(start, offset), min(end, offset + piece.numel())
                if lo < hi:
                    views.append(piece[lo - offset : hi - offset])
        written = out[: sum(v.numel() for v in views)]
        # No views: an empty range (a bucket smaller than the world leaves some ranks' slices empty).
        if views and all(v.dtype == out.dtype and v.device == out.device for v in views):
            torch.cat(views, out=written)  # one kernel
            return written
        k = 0
        # From host memory (a stash_device="cpu" stash): asynchronous where pinned, and PyTorch then
        # converts a bf16 piece for an fp32 bucket on the device (a blocking copy converts on the host).
        upload = not out.is_cpu
        for v in views:
            written[k : k + v.numel()].copy_(v, non_blocking=upload)
            k += v.numel()
        return written

    def dense(self, like: Tensor) -> Tensor:
        """The rows as one [m, n] tensor in ``like``'s dtype and device."""
        only = self.rows[0][0][1] if len(self.rows) == 1 and len(self.rows[0]) == 1 else None
        if only is not None and only.dtype == like.dtype and only.device == like.device:
            return only.view(1, -1)
        return self.write(like.new_empty(len(self.rows) * like.numel()), 0, like.numel()).view(len(self.rows), -1)


class Exchange(ABC):
    """Reduce one bucket: ``reduce(tensor, segments, pieces, solve, group) -> (piece Grams, weights)``.

    ``pieces`` are ``(start, end)`` element ranges that tile the bucket (its parameters): one T×T Gram
    is returned per piece, and the solver sees their sum, the bucket's Gram.

    ``layout`` (:class:`~lightning_moo.layout.LanguageLayout`) says which language each gathered row
    is: with k ranks per language the Grams are those of the T language means and rank r's gradient
    enters with weight ``w_t / k`` (the same messages as one rank per language); with m languages
    per rank, ``others`` holds the rank's first m - 1 languages' rows.
    """

    # Whether ``reduce`` writes the combination into every element of the bucket, not only the
    # elements this rank owns (an engine whose ranks all need the whole bucket then gathers nothing).
    fills_every_element: bool = False

    @abstractmethod
    def reduce(
        self,
        tensor: Tensor,
        segments: Sequence[Segment],
        pieces: Sequence[tuple[int, int]],
        solve: Solve,
        layout: LanguageLayout,
        group=None,
        others: PieceRows | Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Overwrite this rank's segments of ``tensor`` with the solver's combination; return
        ``(G_pieces [P, T, T], w)``. ``others`` (m - 1 rows of n): the gradients of this rank's other
        languages when it trains m, which come before ``tensor``'s language."""

    def gram(self, tensor: Tensor, layout: LanguageLayout, group=None) -> Tensor:
        """The T×T Gram matrix (float64) of the ranks' ``tensor``s, without changing them."""
        mine = _gather_slices(PieceRows.of(tensor), even_segments(tensor.numel(), dist.get_world_size(group)), group, tensor)
        partial = layout.language_grams(gram(mine))
        _sum_over_ranks(partial, group)
        return partial


class AllGatherExchange(Exchange):
    """Every rank gathers the whole bucket from every language and solves on its own."""

    fills_every_element = True

    def reduce(
        self,
        tensor: Tensor,
        segments: Sequence[Segment],
        pieces: Sequence[tuple[int, int]],
        solve: Solve,
        layout: LanguageLayout,
        group=None,
        others: PieceRows | Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        world = dist.get_world_size(group)
        rows = PieceRows.of(tensor, others).dense(tensor)
        # gloo's all-gather into one tensor wants one flat output of world × n elements.
        flat = tensor.new_empty(world * rows.numel())
        _all_gather_single(flat, rows.reshape(-1), group=group)
        grads = flat.view(world * rows.shape[0], tensor.numel())
        grams = layout.language_grams(piece_grams(grads, 0, pieces))
        w = solve(grams.sum(0))
        combine(layout.row_weights(w), grads, out=tensor)
        return grams, w


class ShardedExchange(Exchange):
    """Even slices to every rank, partial Grams, their sum over the ranks (T×T numbers), combined slices to their owners."""

    def __init__(self) -> None:
        # One workspace reused by every bucket: fresh buffers per bucket leave the CPU allocator
        # holding far more than one bucket of freed memory.
        self._workspace: Tensor | None = None

    def reduce(
        self,
        tensor: Tensor,
        segments: Sequence[Segment],
        pieces: Sequence[tuple[int, int]],
        solve: Solve,
        layout: LanguageLayout,
        group=None,
        others: PieceRows | Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        rows = PieceRows.of(tensor, others)
        # Even slices, not DeepSpeed's partitions: a bucket often lies inside one rank's partition,
        # and that rank would then receive all T copies of it and solve alone.
        slices = even_segments(tensor.numel(), world)
        m = slices[rank].length
        gathered = world * len(rows)
        # Layout: [received R×m slices, later reused for the second all-to-all | combined slice].
        scratch_len = max(gathered * m, tensor.numel())
        work = self._buffer(scratch_len + m, tensor)
        scratch, combined = work[:scratch_len], work[scratch_len:]
        mine = _gather_slices(rows, slices, group, tensor, out=scratch[: gathered * m].view(gathered, m))
        # Partial Grams of the pieces within this rank's slice, summed over the ranks (P×T×T numbers).
        grams = layout.language_grams(piece_grams(mine, slices[rank].start, pieces))
        _sum_over_ranks(grams, group)
        w = solve(grams.sum(0))
        if world == 1 and _tiles(segments, tensor.numel()):
            # One rank owns the whole bucket, and ``mine`` holds copies of its rows: combine straight
            # into it (the same kernel and bits) instead of into the workspace and then copying.
            combine(layout.row_weights(w), mine, out=tensor)
        else:
            combine(layout.row_weights(w), mine, out=combined)
            _send_to_owners(tensor, combined, slices, segments, rank, group, scratch)
        return grams, w

    def _buffer(self, numel: int, like: Tensor) -> Tensor:
        ws = self._workspace
        if ws is None or ws.numel() < numel or ws.dtype != like.dtype or ws.device != like.device:
            self._workspace = ws = like.new_empty(numel)
        return ws[:numel]


def _send_to_owners(
    tensor: Tensor, combined: Tensor, slices: Sequence[Segment], segments: Sequence[Segment], rank: int, group, scratch: Tensor
) -> None:
    """Second all-to-all: each rank's combined slice goes to the owners of its elements.

    Senders and receivers both walk ``segments`` in order, so the pieces arrive in the order the
    receiver expects them.
    """
    world = len(slices)
    lo, hi = slices[rank].start, slices[rank].start + slices[rank].length
    if _combined_where_owned(segments, slices):
        # Every element is owned by the rank that combined it (DDP's and ZeRO-3's segments are
        # the slices): nothing to send, and skipping the collective is the same decision on every
        # rank, made from what every rank knows alike.
        for seg in segments:
            if seg.owner == rank and seg.length:
                tensor[seg.start : seg.start + seg.length].copy_(combined[seg.start - lo : seg.start - lo + seg.length])
        return
    outgoing: list[list[tuple[int, int]]] = [[] for _ in range(world)]
    incoming: list[list[tuple[int, int]]] = [[] for _ in range(world)]
    for seg in segments:
        end = seg.start + seg.length
        if max(seg.start, lo) < min(end, hi):
            outgoing[seg.owner].append((max(seg.start, lo) - lo, min(end, hi) - max(seg.start, lo)))
        if seg.owner == rank:
            for source, sl in enumerate(slices):
                a, b = max(seg.start, sl.start), min(end, sl.start + sl.length)
                if a < b:
                    incoming[source].append((a, b - a))
    send_sizes = [sum(n for _, n in pieces) for pieces in outgoing]
    recv_sizes = [sum(n for _, n in pieces) for pieces in incoming]
    pieces = [piece for per_owner in outgoing for piece in per_owner]
    if all(a + n == b for (a, n), (b, _) in zip(pieces, pieces[1:])):
        send = combined[pieces[0][0] : pieces[0][0] + sum(send_sizes)] if pieces else combined[:0]
    else:
        send = torch.cat([combined[a : a + n] for a, n in pieces])
    recv = scratch[: sum(recv_sizes)]
    dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=group)
    offset = 0
    for start, n in (piece for per_source in incoming for piece in per_source):
        tensor[start : start + n].copy_(recv[offset : offset + n])
        offset += n


def _tiles(segments: Sequence[Segment], numel: int) -> bool:
    """Whether ``segments`` cover ``[0, numel)`` exactly, each element once."""
    end = 0
    for seg in sorted(segments, key=lambda seg: seg.start):
        if seg.start != end:
            return False
        end += seg.length
    return end == numel


def _combined_where_owned(segments: Sequence[Segment], slices: Sequence[Segment]) -> bool:
    """Whether every slice's elements all belong to the rank that combines that slice."""
    for seg in segments:
        end = seg.start + seg.length
        for source, sl in enumerate(slices):
            if source != seg.owner and max(seg.start, sl.start) < min(end, sl.start + sl.length):
                return False
    return True


def _gather_slices(rows: PieceRows, slices: Sequence[Segment], group, like: Tensor, out: Tensor | None = None) -> Tensor:
    """All-to-all: rank r receives slice r of every rank's m rows, as an (N·m)×len matrix whose row
    ``rank·m + i`` is row i of that rank. What is sent is copied once, straight from the pieces
    (one language's contiguous gradient is sent as it is)."""
    world, rank = len(slices), dist.get_rank(group)
    count, length = len(rows), slices[rank].length
    mine = like.new_empty(world * count, length) if out is None else out
    if world == 1:  # the all-to-all would only copy the rows to this rank: copy them straight in
        rows.write(mine.view(-1), 0, length)
        return mine
    if count == 1 and len(rows.rows[0]) == 1:
        send = rows.rows[0][0][1]
    else:  # each destination's slice of all m rows, contiguous
        send, k = like.new_empty(count * like.numel()), 0
        for s in slices:
            k += rows.write(send[k:], s.start, s.start + s.length).numel()
    dist.all_to_all_single(mine.view(-1), send, [count * length] * world, [count * s.length for s in slices], group=group)
    return mine


def _sum_over_ranks(partial: Tensor, group) -> None:
    """Sum ``partial`` (a few Grams) over the ranks, in place; one rank (several languages on one GPU)
    holds the sum already.

    On gloo every rank gathers every rank's partial and sums them locally in rank order, so all hold
    the same bits. For so few numbers the cost is latency, not bytes: gloo's ring all-reduce takes
    2(N − 1) rounds, its ring all-gather N − 1, its all-to-all one (it posts every transfer before
    waiting for any). From 3 ranks on the partials go by all-to-all (4 ranks: 0.97–0.99× stock ZeRO-2
    against 1.02–1.03× with the all-gather); at 2 ranks, where both take one round, the all-gather
    measured ~0.02× faster (``overhead_zero2.md``, last section). NCCL keeps its all-reduce, whose
    volume does not grow with N.
    """
    world = dist.get_world_size(group)
    if world == 1:
        return
    if dist.get_backend(group) != "gloo":
        dist.all_reduce(partial, group=group)
        return
    gathered = partial.new_empty(world, *partial.shape)
    if world == 2:
        _all_gather_single(gathered.view(-1), partial.reshape(-1), group=group)
    else:
        every = partial.reshape(1, -1).expand(world, -1).contiguous()
        dist.all_to_all_single(gathered.view(-1), every.view(-1), group=group)
    torch.sum(gathered, dim=0, out=partial)


def _all_gather_single(output: Tensor, input: Tensor, group) -> None:
    """torch 2.13 renamed ``all_gather_into_tensor`` (deprecated since) to ``all_gather_single``."""
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(output, input, group=group)


EXCHANGES: dict[str, type[Exchange]] = {"allgather": AllGatherExchange, "sharded": ShardedExchange}


def make_exchange(name: str) -> Exchange:
    try:
        return EXCHANGES[name]()
    except KeyError:
        raise ValueError(f"unknown exchange {name!r}; choose one of {sorted(EXCHANGES)}") from None
