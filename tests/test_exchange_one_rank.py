"""One rank training several languages (the one-GPU recipes): the sharded exchange makes no collective
call, and what it writes is the weighted sum of the languages' gradients, checked in NumPy."""

import numpy as np
import pytest
import torch
import torch.distributed as dist

from lightning_moo.buckets import Segment
from lightning_moo.exchange import PieceRows, ShardedExchange
from lightning_moo.layout import LanguageLayout


@pytest.fixture
def one_rank(tmp_path, monkeypatch):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)

    def refuse(*args, **kwargs):
        raise AssertionError("a collective was called on one rank")

    for name in ("all_to_all_single", "all_reduce", "all_gather_into_tensor", "all_gather_single"):
        if hasattr(dist, name):
            monkeypatch.setattr(dist, name, refuse)
    try:
        yield
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()


@pytest.mark.parametrize("languages", [2, 4])
def test_one_rank_combines_without_a_collective(one_rank, languages):
    rng = np.random.default_rng(languages)
    n, pieces = 37, [(0, 10), (10, 11), (11, 37)]
    rows = rng.standard_normal((languages, n))
    weights = rng.dirichlet(np.ones(languages))
    tensor = torch.tensor(rows[-1])  # the language DeepSpeed's buckets hold; the others are stashed
    seen = []

    def solve(gram):
        seen.append(gram.clone())
        return torch.tensor(weights)

    piece_grams, w = ShardedExchange().reduce(
        tensor, (Segment(0, n, 0),), pieces, solve, LanguageLayout.build(languages, 1), others=torch.tensor(rows[:-1]))
    expected = [rows[:, a:b] @ rows[:, a:b].T for a, b in pieces]
    np.testing.assert_allclose(piece_grams.numpy(), np.stack(expected), rtol=1e-12)
    np.testing.assert_allclose(seen[0].numpy(), rows @ rows.T, rtol=1e-12)
    np.testing.assert_allclose(tensor.numpy(), weights @ rows, rtol=1e-12)
    assert torch.equal(w, torch.tensor(weights))



def test_one_rank_leaves_what_no_segment_owns(one_rank):
    """Elements outside every segment keep the rank's own gradient (as on several ranks, where an
    exchange writes only the elements this rank owns); the owned ones get the combination."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((2, 30))
    weights = np.array([0.25, 0.75])
    tensor = torch.tensor(rows[-1])
    ShardedExchange().reduce(tensor, (Segment(0, 12, 0), Segment(20, 10, 0)), [(0, 30)], lambda gram: torch.tensor(weights),
                             LanguageLayout.build(2, 1), others=torch.tensor(rows[:-1]))
    owned = np.r_[0:12, 20:30]
    np.testing.assert_allclose(tensor.numpy()[owned], (weights @ rows)[owned], rtol=1e-12)
    assert np.array_equal(tensor.numpy()[12:20], rows[-1, 12:20])


def test_piece_rows_write_converts_into_place():
    """Rows kept as pieces of mixed dtypes (bf16 stashed gradients, an fp32 bucket) land row after row,
    each element converted exactly, in the requested column range; pieces of the target dtype too."""
    rng = np.random.default_rng(3)
    n = 23
    values = rng.standard_normal((3, n)).astype(np.float32)
    stashed = [torch.tensor(values[i]).to(torch.bfloat16) for i in range(2)]
    rows = PieceRows([[(0, row[:9]), (9, row[9:])] for row in stashed] + [[(0, torch.tensor(values[2]))]])
    exact = np.stack([row.float().numpy() for row in stashed] + [values[2]])  # bf16 → fp32 is exact
    for start, end in [(0, n), (5, 17), (9, 10), (0, 9)]:
        out = torch.full((3 * n + 4,), float("nan"))
        written = rows.write(out, start, end)
        assert written.data_ptr() == out.data_ptr() and written.numel() == 3 * (end - start)
        np.testing.assert_array_equal(written.numpy(), exact[:, start:end].reshape(-1))
        assert torch.isnan(out[written.numel():]).all()  # nothing past the written part
    same = PieceRows([[(0, torch.tensor(values[0, :4])), (4, torch.tensor(values[0, 4:]))]])
    np.testing.assert_array_equal(same.write(torch.empty(n), 2, n).numpy(), values[0, 2:])
    for pieces in (rows, same):  # an empty range (a rank's slice of a bucket smaller than the world)
        assert pieces.write(torch.empty(n), 5, 5).numel() == 0
    np.testing.assert_array_equal(rows.dense(torch.empty(n)).numpy(), exact)


def test_one_rank_with_bf16_stashed_pieces(one_rank):
    """The one-GPU recipe in bf16 with fp32 gradient accumulation: three languages stashed as bf16
    parameter pieces, the fourth in the fp32 bucket; Grams and combination as from the exact fp32 values."""
    rng = np.random.default_rng(7)
    n, pieces = 40, [(0, 15), (15, 16), (16, 40)]
    stashed = [torch.tensor(rng.standard_normal(n), dtype=torch.bfloat16) for _ in range(3)]
    last = rng.standard_normal(n).astype(np.float32)
    rows = np.stack([s.double().numpy() for s in stashed] + [last.astype(np.float64)])
    weights = rng.dirichlet(np.ones(4))
    tensor = torch.tensor(last)
    others = PieceRows([[(a, s[a:b]) for a, b in pieces] for s in stashed])
    piece_grams, _ = ShardedExchange().reduce(tensor, (Segment(0, n, 0),), pieces, lambda gram: torch.tensor(weights),
                                              LanguageLayout.build(4, 1), others=others)
    np.testing.assert_allclose(piece_grams.numpy(), np.stack([rows[:, a:b] @ rows[:, a:b].T for a, b in pieces]), rtol=1e-5)
    np.testing.assert_allclose(tensor.numpy(), weights @ rows, rtol=1e-5, atol=1e-6)
