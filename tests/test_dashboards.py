"""ConflictMonitor's dashboards: per-language runs, bounded tags on an 8B-sized bucket layout, legible
heatmaps, and the module's per-language metrics mirrored into the language runs.

Values are checked against the explicit per-language gradients the Grams were built from."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from llama_buckets import llama_buckets, llama_parameter_names
from test_conflict_monitor_unit import Net, figures_not_pixels, monitor_on  # noqa: F401 (autouse fixture)
from torch.nn.functional import cosine_similarity

from lightning_moo import metrics
from lightning_moo.buckets import BucketInfo, ParamRange
from lightning_moo.callbacks.conflict_figures import DPI, bucket_pair_figure
from lightning_moo.callbacks.conflict_monitor import in_model_order, split_by_language
from lightning_moo.callbacks.conflict_records import Limits, conflict_records, scalar_bounds

LANGS8 = ["eng", "deu", "fra", "spa", "hin", "jpn", "rus", "swh"]


def weighted_toy(seed: int = 0):
    """Three buckets of explicit gradients J [T=3, 30] with different, non-uniform weights per bucket."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(3, 30, generator=g, dtype=torch.float64)
    spans = [("head.weight", 0, 6), ("body.weight", 6, 15), ("embed.weight", 15, 30)]
    weights = torch.softmax(torch.randn(3, 3, generator=g, dtype=torch.float64), dim=1)
    buckets = {}
    for index, (name, start, end) in enumerate(spans):
        block = J[:, start:end]
        buckets[index] = BucketInfo(index, (ParamRange(name, 0, end - start),), end - start, block @ block.T, weights[index], 0)
    return J, spans, weights, buckets


def test_language_runs_hold_norm_weight_and_progress_of_each_language(tmp_path):
    J, spans, weights, buckets = weighted_toy()
    names = ["en", "de", "fr"]
    # The real path: metrics and images on the writer thread.
    strategy = SimpleNamespace(buckets=buckets, languages=names)
    monitor, trainer, runs = monitor_on(tmp_path, strategy, log_every_n_steps=1, image_every_n_steps=1, background=True)
    trainer.global_step = 1
    monitor.on_train_batch_end(trainer, None, None, None, 0)
    monitor.wait()
    # The applied direction, built from the gradients: bucket b contributes Σ_t w_bt J_t over its elements.
    d = torch.cat([weights[b] @ J[:, start:end] for b, (_, start, end) in enumerate(spans)])
    numel = torch.tensor([end - start for _, start, end in spans], dtype=torch.float64)
    for t, name in enumerate(names):
        logged = runs[f"language/{name}"].scalars
        assert logged[("by_language/grad_norm", 0)] == pytest.approx(float(J[t].norm()), rel=1e-12)
        assert logged[("by_language/solver_weight", 0)] == pytest.approx(float(numel @ weights[:, t] / numel.sum()), rel=1e-12)
        assert logged[("by_language/progress", 0)] == pytest.approx(float(J[t] @ d / d.norm()), rel=1e-10)
        # A bucket's weight is that bucket's own solver weight.
        assert logged[("conflict/bucket_1/weight", 0)] == pytest.approx(float(weights[1, t]), rel=1e-12)
    assert runs[""].scalars[("conflict/global/direction_norm", 0)] == pytest.approx(float(d.norm()), rel=1e-12)
    assert ("conflict/images/bucket_pair_cosines", 0) in runs[""].figures
    monitor.teardown(trainer, None, "fit")  # stops the writer thread
    # The logger's own run holds no per-language tag: languages are told apart by run.
    assert not any(name in tag for tag, _ in runs[""].scalars for name in names)
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
        cos = runs[f"pair/{a}-{b}"].scalars[("by_pair/cosine", 0)]
        assert cos == pytest.approx(float(cosine_similarity(J[i], J[j], dim=0)), abs=1e-12)


def test_an_8b_sized_layout_writes_a_bounded_number_of_scalars():
    """160 buckets, 32 blocks, 8 languages: ~4,000 scalars per logged step before; now a few hundred."""
    buckets, _, grads = llama_buckets(layers=32, buckets=160, languages=8)
    records = conflict_records(buckets, LANGS8)
    # 288 series and 72 tags with conflict_records' four default shadow directions (docs/monitoring.md: the
    # monitor's five give 298 and 75)
    assert records.scalar_series <= 300 and len(records.scalar_tags) <= 80
    tags, series = scalar_bounds(8)
    assert records.scalar_series <= series and len(records.scalar_tags) <= tags
    assert not any("/bucket_" in tag or tag.startswith("conflict/layer_1") for tag in records.scalar_tags)
    # The per-bucket and per-layer detail is still there, as histograms over buckets and over blocks.
    assert len(records.histograms[""]["conflict/buckets/cosine_mean"]) == 160
    assert len(records.histograms[""]["conflict/layers/cosine_min"]) == 32
    assert len(records.histograms["language/hin"]["conflict/buckets/weight"]) == 160
    # A layer group's cosine from the explicit gradients of its blocks.
    block = torch.cat([g for name, g in grads.items() if metrics.layer_index(name) in range(8, 16)], dim=1)
    cos = [float(cosine_similarity(block[i], block[j], dim=0)) for i, j in itertools.combinations(range(8), 2)]
    assert records.scalars[""]["conflict/layers_8-15/cosine_mean"] == pytest.approx(np.mean(cos), abs=1e-12)
    assert records.scalars[""]["conflict/layers_8-15/cosine_min"] == pytest.approx(min(cos), abs=1e-12)


@pytest.mark.parametrize("languages", [2, 5])
def test_the_documented_bounds_hold_for_every_shape(languages):
    names = LANGS8[:languages]
    limits = Limits(max_bucket_scalars=6, max_layer_scalars=3, layer_groups=2)
    tags, series = scalar_bounds(languages, limits)
    for layers, count in itertools.product((1, 3, 4, 9), (1, 6, 7, 25)):
        if count > len(llama_parameter_names(layers)):
            continue  # a bucket holds at least one parameter
        buckets, _, _ = llama_buckets(layers=layers, buckets=count, languages=languages)
        records = conflict_records(buckets, names, limits)
        assert records.scalar_series <= series and len(records.scalar_tags) <= tags, (layers, count)
        assert any("/bucket_" in t for t in records.scalar_tags) == (count <= 6)
        assert any(t.startswith("conflict/layers_") for t in records.scalar_tags) == (layers > 3)


def test_a_160_bucket_heatmap_is_legible_at_the_default_size():
    buckets, names, _ = llama_buckets(layers=32, buckets=160, languages=4)
    ordered = in_model_order(buckets, names)
    fig = bucket_pair_figure(ordered, LANGS8[:4])
    width, height = fig.get_size_inches() * DPI
    assert width <= 1400 and height <= 750
    ax = fig.axes[0]
    fig.canvas.draw()
    ticks = [ax.transData.transform((0, y))[1] for y in ax.get_yticks()]
    assert min(abs(a - b) for a, b in zip(ticks, ticks[1:])) >= 11  # labels never overlap
    labels = [t.get_text() for t in ax.get_yticklabels()]
    blocks = [int(label[1:]) for label in labels if label.startswith("L")]
    assert blocks[0] == 0 and blocks[-1] == 31 and blocks == sorted(blocks)  # model order, first and last block named
    assert not ax.texts  # 160 rows leave no room for numbers in the cells
    values = ax.images[0].get_array().data
    for row in (0, 80, 159):
        assert values[row].tolist() == pytest.approx(metrics.pairwise_cosines(ordered[row].gram).tolist(), abs=1e-12)


def test_above_the_limit_the_monitor_writes_histograms_and_images_instead_of_bucket_scalars(tmp_path):
    buckets, _, _ = llama_buckets(layers=32, buckets=40, languages=4, step=0)
    strategy = SimpleNamespace(buckets=dict(enumerate(buckets)), languages=LANGS8[:4])
    monitor, trainer, runs = monitor_on(tmp_path, strategy, log_every_n_steps=1, image_every_n_steps=1)
    trainer.global_step = 1
    monitor.on_train_batch_end(trainer, None, None, None, 0)
    monitor.wait()
    assert not any("/bucket_" in tag for tag, _ in runs[""].scalars)
    assert ("conflict/buckets/gap", 0) in runs[""].histograms
    assert ("conflict/buckets/weight", 0) in runs["language/deu"].histograms
    assert {tag for tag, _ in runs[""].figures} == {
        f"conflict/images/{name}" for name in ("bucket_pair_cosines", "bucket_step_cosines", "layer_profile", "language_cosines")
    }


def test_split_by_language_reads_the_longest_matching_code():
    values = {"val/bpb_eng_Latn": 1.0, "val/bpb_Latn": 2.0, "val/bpb_seen": 3.0, "train/loss_eng_Latn": 4.0, "val/acc_eng_Latn": 0.5}
    assert split_by_language(values, "val", ["Latn", "eng_Latn"]) == {
        "eng_Latn": {"val/bpb": 1.0, "val/acc": 0.5},
        "Latn": {"val/bpb": 2.0},
    }


def test_the_modules_per_language_metrics_are_mirrored_into_the_language_runs(tmp_path):
    strategy = SimpleNamespace(buckets={}, languages=["eng_Latn", "deu_Latn"])
    monitor, trainer, runs = monitor_on(tmp_path, strategy)
    module = Net()
    module.kinds = {"eng_Latn": "seen", "deu_Latn": "seen", "fra_Latn": "unseen"}
    trainer.log_every_n_steps = 5
    trainer.callback_metrics = {"train/loss_eng_Latn": torch.tensor(2.5), "train/loss_deu_Latn": torch.tensor(3.5), "train/loss": torch.tensor(3.0)}
    for global_step in range(1, 11):  # Lightning writes steps 4 and 9 (the (s + 1) % 5 == 0 rule)
        trainer.global_step = global_step
        monitor.on_train_batch_end(trainer, module, None, None, global_step)
        monitor.wait()
    assert runs["language/eng_Latn"].scalars == {("by_language/train_loss", 4): 2.5, ("by_language/train_loss", 9): 2.5}
    assert runs["language/deu_Latn"].scalars[("by_language/train_loss", 9)] == 3.5
    trainer.callback_metrics = {"val/bpb_fra_Latn": torch.tensor(1.25), "val/bpb_unseen": torch.tensor(1.25)}
    trainer.state = SimpleNamespace(fn="fit")
    monitor.on_validation_end(trainer, module)
    monitor.wait()
    assert runs["language/fra_Latn"].scalars == {("by_language/val_bpb", 9): 1.25}  # Lightning's step for it
    assert not runs[""].scalars  # the module's own tags stay where the module logged them
