"""LanguageLayout against an explicit assignment built by hand, one shape at a time."""

import itertools

import pytest
import torch

from lightning_moo.layout import LanguageLayout, LayoutError

# (T, N) -> which languages each rank trains, written out rather than computed.
EXPLICIT = {
    (4, 4): [[0], [1], [2], [3]],
    (2, 4): [[0], [0], [1], [1]],
    (3, 6): [[0], [0], [1], [1], [2], [2]],
    (4, 2): [[0, 1], [2, 3]],
    (6, 3): [[0, 1], [2, 3], [4, 5]],
    (3, 1): [[0, 1, 2]],
    (1, 1): [[0]],
    (1, 3): [[0], [0], [0]],
}


@pytest.mark.parametrize("shape", sorted(EXPLICIT))
def test_languages_ranks_and_rows_follow_the_explicit_assignment(shape):
    T, N = shape
    layout = LanguageLayout.build([f"l{t}" for t in range(T)], N)
    assignment = EXPLICIT[shape]
    assert [list(layout.languages_of(r)) for r in range(N)] == assignment
    for t in range(T):
        assert list(layout.ranks_of(t)) == [r for r in range(N) if t in assignment[r]]
        assert layout.ranks_of(f"l{t}") == layout.ranks_of(t)
    # Rows in rank order, each rank's languages in order: row i is (rank, language) pair i.
    pairs = [(r, t) for r in range(N) for t in assignment[r]]
    assert layout.rows == len(pairs)
    for t in range(T):
        assert list(layout.rows_of(t)) == [i for i, (_, lang) in enumerate(pairs) if lang == t]
    k = N // T if N >= T else 1
    assert [layout.replica_of(r) for r in range(N)] == [r % k for r in range(N)]


@pytest.mark.parametrize("shape", sorted(EXPLICIT))
def test_language_grams_and_row_weights_are_those_of_the_language_means(shape):
    T, N = shape
    layout = LanguageLayout.build(T, N)
    rows = torch.randn(layout.rows, 7, dtype=torch.float64)
    # The mean gradient of each language over its rows, built from the assignment by hand.
    pairs = [(r, t) for r in range(N) for t in EXPLICIT[shape][r]]
    means = torch.stack([rows[[i for i, (_, lang) in enumerate(pairs) if lang == t]].mean(0) for t in range(T)])
    torch.testing.assert_close(layout.language_grams(rows @ rows.T), means @ means.T)
    w = torch.rand(T, dtype=torch.float64)
    torch.testing.assert_close(layout.row_weights(w) @ rows, w @ means)


def test_describe_names_rank_and_languages():
    assert LanguageLayout.build(["deu", "hin"], 2).describe(1) == "language hin"
    assert LanguageLayout.build(2, 2).describe(1) == "language 1"
    assert LanguageLayout.build(["deu", "hin"], 4).describe(3) == "rank 3 (language hin, replica 2 of 2)"
    assert LanguageLayout.build(["deu", "rus", "jpn", "hin"], 2).describe(1) == "rank 1 (languages jpn, hin)"


def test_frozen():
    layout = LanguageLayout.build(2, 2)
    with pytest.raises(AttributeError):
        layout.world_size = 4


@pytest.mark.parametrize("T, N", [(T, N) for T, N in itertools.product(range(1, 7), range(1, 7)) if (T % N if T >= N else N % T)])
def test_shapes_that_do_not_fit_are_refused_with_the_fix(T, N):
    with pytest.raises(LayoutError) as error:
        LanguageLayout.build(T, N)
    message = str(error.value)
    assert f"world size {N}" in message and str(T) in message and "devices × num_nodes" in message
    assert isinstance(error.value, ValueError)  # DataModules raise ValueErrors; strategies MisconfigurationExceptions


def test_bad_names_and_ranks():
    with pytest.raises(LayoutError, match=r"name \['deu'\] more than once"):
        LanguageLayout.build(["deu", "deu"], 2)
    with pytest.raises(LayoutError, match="at least one language"):
        LanguageLayout.build([], 1)
    layout = LanguageLayout.build(["deu", "hin"], 2)
    with pytest.raises(KeyError, match="'fra' is not one of the languages"):
        layout.ranks_of("fra")
    with pytest.raises(IndexError):
        layout.languages_of(2)
