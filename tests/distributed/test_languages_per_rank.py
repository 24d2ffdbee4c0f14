"""More languages than ranks: one process trains T languages and must equal the T-rank run (per-bucket
and global MOO); two
ranks with two languages each must apply MGDA of all four languages' gradients per bucket."""

from __future__ import annotations

import pytest
import torch
from checks import assert_close, assert_mgda_per_bucket, assert_ranks_identical, language_grads
from launch import run_ranks
from test_bucket_moo import BUCKET, LR, solver, trajectory


SGD = dict(optimizer="sgd", lr=LR, reduce_bucket_size=BUCKET, steps=3, solver=solver("MGDA"))


@pytest.mark.timeout(400)
def test_one_process_with_two_languages_equals_the_two_rank_run(tmp_path):
    single = run_ranks(
        [dict(name="one_process", languages=2, languages_per_rank=2, **SGD),
         dict(name="one_process_allgather", languages=2, languages_per_rank=2, exchange="allgather", **SGD),
         dict(name="one_process_stash_cpu", languages=2, languages_per_rank=2, stash_device="cpu", **SGD),
         dict(name="one_process_global", languages=2, languages_per_rank=2, mode="global", **SGD)],
        _dir(tmp_path / "one"), world_size=1,
    )
    distributed = run_ranks(
        [dict(name="two_ranks", languages=2, **SGD), dict(name="two_ranks_global", languages=2, mode="global", **SGD)],
        _dir(tmp_path / "two"), world_size=2,
    )
    for name in ("one_process", "one_process_allgather", "one_process_stash_cpu", "one_process_global"):
        run = single[name][0]
        reference = distributed["two_ranks_global" if name.endswith("global") else "two_ranks"][0]
        # The same buckets (parameters and order) as the distributed run, the same Grams and weights.
        for ours, theirs in zip(run["buckets"], reference["buckets"]):
            assert sorted(ours) == sorted(theirs)
            for i in ours:
                assert [p.name for p in ours[i].params] == [p.name for p in theirs[i].params]
                torch.testing.assert_close(ours[i].gram, theirs[i].gram, rtol=1e-6, atol=1e-12)
                torch.testing.assert_close(ours[i].weights, theirs[i].weights, rtol=1e-6, atol=1e-9)
        for a, b in zip(trajectory(run), trajectory(reference)):
            assert_close(a, b, rtol=1e-6)


@pytest.mark.timeout(400)
def test_two_ranks_with_two_languages_each_solve_all_four(tmp_path):
    result = run_ranks([dict(name="four", languages=4, languages_per_rank=2, **SGD)], tmp_path, world_size=2)["four"]
    assert_ranks_identical(result)
    thetas = trajectory(result[0])
    grads_at = lambda step: [language_grads(thetas[step], t, step) for t in range(4)]  # noqa: E731
    assert_mgda_per_bucket(thetas, result[0]["buckets"], grads_at, LR, buckets_per_step=3)


@pytest.mark.timeout(300)
def test_languages_that_do_not_split_over_the_ranks_are_refused(tmp_path):
    result = run_ranks([dict(name="three", languages=3, languages_per_rank=2, expect_error=True, **SGD)], tmp_path, world_size=2)
    for rank_result in result["three"]:
        assert "3 languages do not split over world size 2" in rank_result["error"], rank_result["error"]


def _dir(path):
    path.mkdir()
    return path


@pytest.mark.timeout(300)
def test_global_two_pass_with_several_languages_per_rank_is_refused(tmp_path):
    result = run_ranks([dict(name="two_pass", languages=2, languages_per_rank=2, mode="global_two_pass", expect_error=True, **SGD)],
                       tmp_path, world_size=1)
    assert "use as many ranks as languages for global_two_pass" in result["two_pass"][0]["error"]
