"""One rank training several languages (the one-GPU recipes): the sharded exchange makes no collective
call, and what it writes is the weighted sum of the languages' gradients, checked in NumPy."""

import numpy as np
import pytest
import torch
import torch.distributed as dist

from lightning_moo.buckets import Segment
from lightning_moo.exchange import ShardedExchange
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
