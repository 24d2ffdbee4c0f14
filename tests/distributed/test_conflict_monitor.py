"""ConflictMonitor end to end: 2 gloo ranks train the toy with BucketMOOStrategy, and the TensorBoard
events it wrote must hold the cosines, conflict ratios and norms of the per-language gradients that
plain autograd gives for the same parameters and batches."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from checks import language_grads
from launch import run_ranks
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.nn.functional import cosine_similarity

LANGUAGES = ["en", "de"]
STEPS = 3
BUCKET = 600  # three buckets for the toy net, as in test_bucket_moo


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    out = tmp_path_factory.mktemp("conflict_monitor")
    run = dict(
        name="monitored",
        solver={"class_path": "lightning_moo.solvers.MGDA"},
        languages=LANGUAGES,
        steps=STEPS,
        reduce_bucket_size=BUCKET,
        monitor=dict(log_every_n_steps=1, image_every_n_steps=2),
    )
    results = run_ranks([run], out)["monitored"]
    root = out / "monitored"
    events = sorted(str(p.parent.relative_to(root)) for p in root.rglob("events.out.tfevents.*"))
    # Rank zero alone writes: one event file per run — the logger's, each language's, the pair's.
    assert events == [".", "language/de", "language/en", "pair/en-de"], events
    runs = {}
    for run in events:
        runs[run] = EventAccumulator(str(root / run), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
        runs[run].Reload()
    return results, runs


def scalar(acc: EventAccumulator, tag: str, step: int) -> float:
    values = [e.value for e in acc.Scalars(tag) if e.step == step]
    assert len(values) == 1, f"{tag}: expected one value at step {step}, got {values}"
    return values[0]


def flat(grads: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([grads[n].reshape(-1) for n in names]).double()


def expected_group(vectors: list[torch.Tensor]) -> dict[tuple[str, str], float]:
    """(run, scalar) → value: cosines and conflict ratio (the logger's run) and each language's
    gradient norm (its own run), straight from the gradient vectors."""
    cos = [float(cosine_similarity(vectors[i], vectors[j], dim=0)) for i, j in itertools.combinations(range(len(vectors)), 2)]
    out = {(".", "cosine_mean"): sum(cos) / len(cos), (".", "cosine_min"): min(cos), (".", "conflict_ratio"): sum(c < 0 for c in cos) / len(cos)}
    for name, v in zip(LANGUAGES, vectors):
        out[(f"language/{name}", "grad_norm")] = float(v.norm())
    return out


@pytest.mark.timeout(120)
def test_logged_conflict_metrics_equal_autograd(monitored):
    results, runs = monitored
    acc = runs["."]
    rank0 = results[0]
    assert rank0["error"] is None and results[1]["error"] is None
    for step in range(STEPS):
        params = rank0["snapshots"][step]  # parameters before the step, which its gradients are taken at
        grads = [language_grads(params, t, step) for t in range(len(LANGUAGES))]
        buckets = rank0["buckets"][step]
        assert len(buckets) == 3
        all_names = [p.name for b in buckets.values() for p in b.params]
        assert sorted(all_names) == sorted(params), "the buckets must cover the model exactly once"
        groups = {"global": all_names, "other": all_names}  # the toy's names are no Hugging Face kind
        groups.update({f"bucket_{i}": [p.name for p in b.params] for i, b in buckets.items()})
        for group, names in groups.items():
            for (run, key), value in expected_group([flat(g, names) for g in grads]).items():
                # fp32 gradients, summed in a different order by DeepSpeed: agreement to ~1e-6 relative.
                # The whole model's per-language series sit under by_language/ (first on the Scalars page).
                tag = "by_language/grad_norm" if (group, key) == ("global", "grad_norm") else f"conflict/{group}/{key}"
                logged = scalar(runs[run], tag, step)
                assert logged == pytest.approx(value, rel=1e-5, abs=1e-6), (run, group, key, step)
        v = [flat(g, all_names) for g in grads]
        pair = scalar(runs["pair/en-de"], "by_pair/cosine", step)
        assert pair == pytest.approx(float(cosine_similarity(v[0], v[1], dim=0)), abs=1e-6)
        # Two languages: the min-norm point of the segment [g_en, g_de] in closed form.
        d = v[0] - v[1]
        gamma = float(((v[1] - v[0]) @ v[1] / (d @ d)).clamp(0, 1))
        point = gamma * v[0] + (1 - gamma) * v[1]
        min_norm = float(point.norm() ** 2)
        assert scalar(acc, "conflict/global/gap_global", step) == pytest.approx(min_norm, rel=1e-4, abs=1e-9)
        for i, b in buckets.items():
            for name, w in zip(LANGUAGES, b.weights.tolist()):
                assert scalar(runs[f"language/{name}"], f"conflict/bucket_{i}/weight", step) == pytest.approx(w, rel=1e-6)
        # Each language's first-order decrease per unit step along the direction the buckets applied.
        d = torch.cat([sum(w * flat(g, [p.name for p in b.params]) for w, g in zip(b.weights.tolist(), grads)) for b in buckets.values()])
        for name, g in zip(LANGUAGES, v):
            assert scalar(runs[f"language/{name}"], "by_language/progress", step) == pytest.approx(float(g @ d / d.norm()), rel=1e-5)
        # Direction diagnostics: MGDA's whole-model direction (the min-norm point; the running solver is
        # MGDA, so solver_global is the same) and the mean gradient, against the applied d.
        for tag, x in (("mgda_global", point), ("solver_global", point), ("mean_bucket", (v[0] + v[1]) / 2)):
            assert scalar(acc, f"conflict/global/direction_cos_{tag}", step) == pytest.approx(float(cosine_similarity(d, x, dim=0)), abs=1e-5)
            for name, g in zip(LANGUAGES, v):
                progress = scalar(runs[f"language/{name}"], f"conflict/global/progress_{tag}", step)
                assert progress == pytest.approx(float(g @ x / x.norm()), rel=1e-4, abs=1e-6 * float(g.norm()))
        gap_sum = sum(scalar(acc, f"conflict/bucket_{i}/gap", step) for i in buckets)
        assert scalar(acc, "conflict/global/gap_bucket_sum", step) == pytest.approx(gap_sum, rel=1e-5)
        # Each bucket chooses its own weights, so the bucket-level gap never exceeds the global one.
        assert gap_sum <= scalar(acc, "conflict/global/gap_global", step) * (1 + 1e-5)


@pytest.mark.timeout(120)
def test_images_and_dashboard_layout(monitored):
    _, runs = monitored
    acc = runs["."]
    tags = acc.Tags()
    images = ("bucket_pair_cosines", "bucket_step_cosines", "layer_profile", "language_cosines")
    for tag in (f"conflict/images/{name}" for name in images):
        assert tag in tags["images"]
        assert [e.step for e in acc.Images(tag)] == [0, 2]  # image_every_n_steps=2 over steps 0..2
        assert all(e.encoded_image_string.startswith(b"\x89PNG") for e in acc.Images(tag))
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    # Every conflict chart of the dashboard shows at least one logged series, in some run (the toy
    # module logs no train/ or val/ metrics for the language charts to mirror).
    logged = {t for run in runs.values() for t in run.Tags()["scalars"]}
    for title, patterns in charts.items():
        if not all(p.startswith(("train/", "by_language/train_", "by_language/val_")) for p in patterns):
            assert any(re.search(p, t) for p in patterns for t in logged), f"chart {title!r} matches no tag"
