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
    events = list((out / "monitored").rglob("events.out.tfevents.*"))
    assert len(events) == 1, f"expected one event file (rank zero logs), found {events}"
    acc = EventAccumulator(str(events[0].parent), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return results, acc


def scalar(acc: EventAccumulator, tag: str, step: int) -> float:
    values = [e.value for e in acc.Scalars(tag) if e.step == step]
    assert len(values) == 1, f"{tag}: expected one value at step {step}, got {values}"
    return values[0]


def flat(grads: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([grads[n].reshape(-1) for n in names]).double()


def expected_group(vectors: list[torch.Tensor]) -> dict[str, float]:
    """Cosines, conflict ratio and norms straight from the gradient vectors."""
    cos = [float(cosine_similarity(vectors[i], vectors[j], dim=0)) for i, j in itertools.combinations(range(len(vectors)), 2)]
    out = {"cosine_mean": sum(cos) / len(cos), "cosine_min": min(cos), "conflict_ratio": sum(c < 0 for c in cos) / len(cos)}
    for name, v in zip(LANGUAGES, vectors):
        out[f"grad_norm/{name}"] = float(v.norm())
    return out


@pytest.mark.timeout(120)
def test_logged_conflict_metrics_equal_autograd(monitored):
    results, acc = monitored
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
            for key, value in expected_group([flat(g, names) for g in grads]).items():
                # fp32 gradients, summed in a different order by DeepSpeed: agreement to ~1e-6 relative.
                assert scalar(acc, f"conflict/{group}/{key}", step) == pytest.approx(value, rel=1e-5, abs=1e-6), (group, key, step)
        v = [flat(g, all_names) for g in grads]
        assert scalar(acc, "conflict/global/cosine/en_de", step) == pytest.approx(float(cosine_similarity(v[0], v[1], dim=0)), abs=1e-6)
        # Two languages: the min-norm point of the segment [g_en, g_de] in closed form.
        d = v[0] - v[1]
        gamma = float(((v[1] - v[0]) @ v[1] / (d @ d)).clamp(0, 1))
        min_norm = float((gamma * v[0] + (1 - gamma) * v[1]).norm() ** 2)
        assert scalar(acc, "conflict/global/gap_global", step) == pytest.approx(min_norm, rel=1e-4, abs=1e-9)
        for i, b in buckets.items():
            for name, w in zip(LANGUAGES, b.weights.tolist()):
                assert scalar(acc, f"conflict/bucket_{i}/weight/{name}", step) == pytest.approx(w, rel=1e-6)
        gap_sum = sum(scalar(acc, f"conflict/bucket_{i}/gap", step) for i in buckets)
        assert scalar(acc, "conflict/global/gap_bucket_sum", step) == pytest.approx(gap_sum, rel=1e-5)
        # Each bucket chooses its own weights, so the bucket-level gap never exceeds the global one.
        assert gap_sum <= scalar(acc, "conflict/global/gap_global", step) * (1 + 1e-5)


@pytest.mark.timeout(120)
def test_images_and_dashboard_layout(monitored):
    _, acc = monitored
    tags = acc.Tags()
    for tag in ("conflict/images/bucket_pair_cosines", "conflict/images/language_cosines"):
        assert tag in tags["images"]
        assert [e.step for e in acc.Images(tag)] == [0, 2]  # image_every_n_steps=2 over steps 0..2
        assert all(e.encoded_image_string.startswith(b"\x89PNG") for e in acc.Images(tag))
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    # Every chart of the dashboard shows at least one logged series.
    for title, patterns in charts.items():
        assert any(re.fullmatch(p, t) for p in patterns for t in tags["scalars"]), f"chart {title!r} matches no tag"
