"""ConflictMonitor's direction diagnostics against autograd on a toy model.

Three languages train a small float64 MLP; each language's gradient comes from plain autograd, the
parameters are split into buckets, and every direction the monitor reports — the applied one, the
shadow solvers' per bucket, MGDA's and the running solver's on the whole model, the mean — is built
here from those vectors with independent references (min-norm points by enumerating supports,
CAGrad's dual by a grid and Nelder–Mead). The monitor's numbers come from the Grams alone and must
match; each language's progress must also match the loss change along a tiny step.
"""

from __future__ import annotations

import itertools
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from test_conflict_monitor_unit import figures_not_pixels, monitor_on  # noqa: F401 (autouse fixture)
from torch import nn

from lightning_moo import metrics
from lightning_moo.buckets import BucketInfo, ParamRange
from lightning_moo.callbacks import ConflictMonitor
from lightning_moo.solvers import MGDA, GradVac

NAMES = ["en", "de", "fr"]
C = 0.5  # CAGrad's default radius, which the shadow uses (with the default rescale 1 / (1 + c²))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 6)
        self.second = nn.Linear(6, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


def toy(seed: int = 0):
    """The model, one batch per language, and each language's loss as a function of the parameters."""
    torch.manual_seed(seed)
    model = Toy().double()
    batches = [(torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64) + t) for t in range(len(NAMES))]

    def loss(t: int) -> torch.Tensor:
        x, y = batches[t]
        return ((model(x) - y) ** 2).mean()

    return model, loss


# Buckets in reduction (backward) order, as the strategies number them: head first.
BUCKETS = [("head.weight", "head.bias"), ("second.weight", "second.bias"), ("first.weight", "first.bias")]


def language_gradients(model: nn.Module, loss) -> list[torch.Tensor]:
    """g_t flattened in bucket order, by autograd."""
    params = dict(model.named_parameters())
    order = [params[name] for bucket in BUCKETS for name in bucket]
    return [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss(t), order)]) for t in range(len(NAMES))]


def bucket_spans(model: nn.Module) -> list[tuple[int, int]]:
    sizes = dict((name, p.numel()) for name, p in model.named_parameters())
    spans, start = [], 0
    for bucket in BUCKETS:
        end = start + sum(sizes[name] for name in bucket)
        spans.append((start, end))
        start = end
    return spans


def bucket_infos(model: nn.Module, J: torch.Tensor, weights: torch.Tensor, step: int) -> dict[int, BucketInfo]:
    """What the strategy records: per-parameter Grams of the explicit gradients, the applied weights."""
    sizes = dict((name, p.numel()) for name, p in model.named_parameters())
    infos, offset = {}, 0
    for index, bucket in enumerate(BUCKETS):
        params, grams, local = [], [], 0
        for name in bucket:
            block = J[:, offset : offset + sizes[name]]
            params.append(ParamRange(name, local, local + sizes[name]))
            grams.append(block @ block.T)
            local += sizes[name]
            offset += sizes[name]
        param_grams = torch.stack(grams)
        infos[index] = BucketInfo(index, tuple(params), local, param_grams.sum(0), weights[index], step, param_grams)
    return infos


def min_norm_point(V: np.ndarray) -> np.ndarray:
    """The min-norm point of conv{rows of V}, by solving the KKT system on every support."""
    T, best, point = V.shape[0], np.inf, None
    G = V @ V.T
    for k in range(1, T + 1):
        for S in map(list, itertools.combinations(range(T), k)):
            K = np.zeros((k + 1, k + 1))
            K[:k, :k], K[:k, k], K[k, :k] = G[np.ix_(S, S)], 1, 1
            sol = np.linalg.lstsq(K, np.r_[np.zeros(k), 1.0], rcond=None)[0][:k]
            if (sol >= -1e-12).all():
                x = sol @ V[S]
                if x @ x < best:
                    best, point = x @ x, x
    return point


def cagrad_direction(V: np.ndarray, c: float = C) -> np.ndarray:
    """CAGrad (rescale 1): d = (g0 + c‖g0‖ g_w/‖g_w‖) / (1 + c²), w minimising ⟨g_w, g0⟩ + c‖g0‖‖g_w‖
    over the simplex — a grid, then Nelder–Mead on w = |x| / Σ|x| from its best point."""
    g0 = V.mean(0)
    r = c * np.linalg.norm(g0)

    def objective(w: np.ndarray) -> float:
        gw = w @ V
        return float(gw @ g0 + r * np.linalg.norm(gw))

    steps = 60
    grid = [np.array([a, b, steps - a - b]) / steps for a in range(steps + 1) for b in range(steps + 1 - a)]
    start = min(grid, key=objective)
    res = minimize(lambda x: objective(np.abs(x) / np.abs(x).sum()), start, method="Nelder-Mead",
                   options={"xatol": 1e-13, "fatol": 1e-16, "maxiter": 40000})
    w = np.abs(res.x) / np.abs(res.x).sum()
    gw = w @ V
    return (g0 + r * gw / np.linalg.norm(gw)) / (1 + c * c)


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def setting():
    """Gradients, spans and a non-uniform applied weighting per bucket (any bucket-level solver's output)."""
    model, loss = toy()
    J = torch.stack(language_gradients(model, loss))
    weights = torch.softmax(torch.randn(len(BUCKETS), len(NAMES), generator=torch.Generator().manual_seed(3), dtype=torch.float64), 1)
    return model, loss, J, weights


def run_monitor(tmp_path, buckets, solver, **strategy):
    monitor, trainer, runs = monitor_on(
        tmp_path, SimpleNamespace(buckets=buckets, languages=NAMES, solver=solver, **strategy), log_every_n_steps=1, image_every_n_steps=1000
    )
    trainer.global_step = max(b.step for b in buckets.values()) + 1
    monitor.on_train_start(trainer, None)
    monitor.on_train_batch_end(trainer, None, None, None, 0)
    monitor.wait()
    return monitor, runs


def expected_directions(J: torch.Tensor, weights: torch.Tensor, spans) -> dict[str, np.ndarray]:
    """Every direction the monitor compares, built from the gradient vectors."""
    V = J.numpy()
    per_bucket = lambda direction: np.concatenate([direction(V[:, a:b]) for a, b in spans])  # noqa: E731
    norms = np.linalg.norm(V, axis=1)
    return {
        "applied": np.concatenate([weights[i].numpy() @ V[:, a:b] for i, (a, b) in enumerate(spans)]),
        "mean_bucket": V.mean(0),
        "mgda_bucket": per_bucket(min_norm_point),
        "cagrad_bucket": per_bucket(cagrad_direction),
        "mgda_global": min_norm_point(V),
        # The running solver, MGDA(normalization="l2"), on the whole model: the min-norm point of the unit gradients.
        "solver_global": min_norm_point(V / norms[:, None]),
    }


def test_direction_diagnostics_equal_the_vectors_autograd_gives(tmp_path, setting):
    model, loss, J, weights = setting
    buckets = bucket_infos(model, J, weights, step=0)
    sentinel = MGDA(normalization="l2")
    sentinel.step = -7  # the training thread's instance must never be called from the monitor's thread
    _, runs = run_monitor(tmp_path, buckets, sentinel)
    assert sentinel.step == -7
    directions = expected_directions(J, weights, bucket_spans(model))
    d = directions.pop("applied")
    main = runs[""].scalars
    V = J.numpy()
    assert main[("conflict/global/direction_norm", 0)] == pytest.approx(np.linalg.norm(d), rel=1e-12)
    for t, name in enumerate(NAMES):
        assert runs[f"language/{name}"].scalars[("by_language/progress", 0)] == pytest.approx(V[t] @ d / np.linalg.norm(d), rel=1e-10)
    for tag, x in directions.items():
        tolerance = 1e-6 if tag == "cagrad_bucket" else 1e-9  # the CAGrad reference is a numerical search
        assert main[(f"conflict/global/direction_norm_{tag}", 0)] == pytest.approx(np.linalg.norm(x), rel=tolerance), tag
        assert main[(f"conflict/global/direction_cos_{tag}", 0)] == pytest.approx(cos(d, x), abs=tolerance), tag
        for t, name in enumerate(NAMES):
            logged = runs[f"language/{name}"].scalars[(f"conflict/global/progress_{tag}", 0)]
            assert logged == pytest.approx(V[t] @ x / np.linalg.norm(x), rel=tolerance, abs=tolerance * np.linalg.norm(V[t])), (tag, name)
    # MGDA's whole-model direction is the min-norm point: its squared norm is the global gap, and
    # bucket MGDA's the bucket-level gap.
    assert main[("conflict/global/direction_norm_mgda_global", 0)] ** 2 == pytest.approx(main[("conflict/global/gap_global", 0)], rel=1e-9)
    assert main[("conflict/global/direction_norm_mgda_bucket", 0)] ** 2 == pytest.approx(main[("conflict/global/gap_bucket_sum", 0)], rel=1e-9)
    # No unit direction serves the worst-off language better than MGDA's whole-model one, which gives
    # it exactly ‖min-norm point‖ (docs/monitoring.md): min_t ⟨g_t, u⟩ ≤ ⟨Σ λ*_t g_t, u⟩ ≤ ‖d*‖.
    best = main[("conflict/global/direction_norm_mgda_global", 0)]
    for key in ["by_language/progress", *(f"conflict/global/progress_{tag}" for tag in directions)]:
        worst = min(runs[f"language/{name}"].scalars[(key, 0)] for name in NAMES)
        assert worst <= best * (1 + 1e-12), key
    assert min(runs[f"language/{name}"].scalars[("conflict/global/progress_mgda_global", 0)] for name in NAMES) == pytest.approx(best, rel=1e-9)
    # The diagnostics say something: the directions differ from the applied one and from each other.
    cosines = [main[(f"conflict/global/direction_cos_{tag}", 0)] for tag in directions]
    assert max(cosines) < 0.999 and len({round(c, 6) for c in cosines}) == len(cosines)


@pytest.mark.parametrize("tag", ["applied", "mgda_global", "cagrad_bucket"])
def test_progress_is_the_first_order_loss_decrease_per_unit_step(tmp_path, setting, tag):
    """Central differences of each language's loss along the unit direction −d/‖d‖ (float64, step 1e-5:
    the O(step²) error is far below the tolerance)."""
    model, loss, J, weights = setting
    _, runs = run_monitor(tmp_path, bucket_infos(model, J, weights, step=0), MGDA(normalization="l2"))
    direction = torch.from_numpy(expected_directions(J, weights, bucket_spans(model))[tag])
    unit = direction / direction.norm()
    params = dict(model.named_parameters())
    order = [params[name] for bucket in BUCKETS for name in bucket]
    start = [p.detach().clone() for p in order]

    def losses_at(step: float) -> list[float]:
        with torch.no_grad():
            offset = 0
            for p, p0 in zip(order, start):
                p.copy_(p0 - step * unit[offset : offset + p.numel()].reshape(p.shape))
                offset += p.numel()
            return [float(loss(t)) for t in range(len(NAMES))]

    eps = 1e-5
    ahead, behind = losses_at(eps), losses_at(-eps)
    losses_at(0.0)  # the module-scoped model back where it was
    key = "by_language/progress" if tag == "applied" else f"conflict/global/progress_{tag}"
    for t, name in enumerate(NAMES):
        decrease = (behind[t] - ahead[t]) / (2 * eps)
        assert runs[f"language/{name}"].scalars[(key, 0)] == pytest.approx(decrease, rel=1e-6, abs=1e-8), name


def test_a_stateful_running_solver_is_neither_called_nor_shadowed(tmp_path, setting):
    model, _, J, weights = setting
    solver = GradVac()
    before = repr(solver.state_dict())
    monitor, runs = run_monitor(tmp_path, bucket_infos(model, J, weights, step=0), solver)
    assert repr(solver.state_dict()) == before
    logged = {tag for tag, _ in runs[""].scalars}
    assert "conflict/global/direction_cos_mgda_global" in logged
    assert not any("solver_global" in tag for run in runs.values() for tag, _ in run.scalars)
    charts = [title for category in monitor.layout().values() for title in category]
    assert not any("solver_global" in title for title in charts)


def test_a_loss_normalizing_running_solver_gets_the_steps_losses(tmp_path, setting):
    """MGDA(normalization="loss") on the whole model: the min-norm point of the gradients g_t / L_t."""
    model, loss, J, weights = setting
    losses = torch.tensor([float(loss(t).detach()) for t in range(len(NAMES))], dtype=torch.float64)
    buckets = bucket_infos(model, J, weights, step=0)
    _, runs = run_monitor(tmp_path, buckets, MGDA(normalization="loss"), language_losses=losses)
    V = J.numpy()
    d = expected_directions(J, weights, bucket_spans(model))["applied"]
    x = min_norm_point(V / losses.numpy()[:, None])
    assert runs[""].scalars[("conflict/global/direction_cos_solver_global", 0)] == pytest.approx(cos(d, x), abs=1e-9)
    # Without the losses (none gathered) that one direction is left out, the others are logged.
    _, runs = run_monitor(tmp_path, buckets, MGDA(normalization="loss"), language_losses=None)
    assert ("conflict/global/direction_cos_solver_global", 0) not in runs[""].scalars
    assert ("conflict/global/direction_cos_mgda_global", 0) in runs[""].scalars


def test_every_direction_chart_of_the_dashboard_shows_logged_series(tmp_path, setting):
    model, _, J, weights = setting
    monitor, runs = run_monitor(tmp_path, bucket_infos(model, J, weights, step=0), MGDA())
    logged = {tag for run in runs.values() for tag, _ in run.scalars}
    section = monitor.layout()["direction: applied vs. shadow solvers"]
    for title, (_, patterns) in section.items():
        matched = {tag for tag in logged for p in patterns if re.search(p, tag)}
        assert matched, title
    per_language = {title: patterns for title, (_, patterns) in section.items() if title.startswith("progress per language")}
    assert len(per_language) == 6  # the applied direction and five shadows, one chart each
    # The whole-model chart of ‖d‖ still shows the applied direction's norm alone.
    whole = monitor.layout()["conflict: whole model"]["norm of the applied direction"][1]
    assert {tag for tag in logged for p in whole if re.search(p, tag)} == {"conflict/global/direction_norm"}


@pytest.mark.parametrize(("names", "message"), [(["gradvac"], "stateful"), (["uw"], "loss"), (["nosuch"], "nosuch")])
def test_refuses_shadow_solvers_that_cannot_be_replayed(names, message):
    with pytest.raises(ValueError, match=message):
        ConflictMonitor(shadow_solvers=names)


def test_compare_directions_treats_a_zero_direction_as_orthogonal_to_everything():
    J = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    gram = J @ J.T
    stats = metrics.compare_directions([gram], [torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])])
    assert stats.norms.tolist() == [0.0, 1.0]
    assert stats.cosines[0, 1] == 0 and stats.cosines[1, 1] == 1
    assert stats.progress.tolist() == [[0.0, 0.0], [1.0, -1.0]]
