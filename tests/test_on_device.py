"""MGDA and CAGrad solved on the gradients' device (enumeration over supports): exact, and free of
host reads.

References: SciPy's NNLS on the gradient vectors (independent of the Gram and of enumeration), the
KKT conditions of the min-norm problem, and the host active-set solver. "No host read" is checked
on PyTorch's meta device, where any value read (``.item()``, ``bool()``, ``.numpy()``, a copy to
the host) raises: what on CUDA would stall the thread that launches the backward's kernels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import nnls
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_moo.solvers import MGDA, CAGrad, Mean, UPGrad
from lightning_moo.solvers.on_device import MAX_TASKS, min_norm_weights_on_device


def jacobian(kind: str, T: int, seed: int, n: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.normal(size=(T, n))
    if kind == "half_opposed":  # a shared component, half of the tasks against it
        J = 0.3 * rng.normal(size=n) + rng.normal(size=(T, n))
        J[T // 2 :] *= -0.5
        return J
    if kind == "rank_deficient":
        r = max(1, T // 3)
        return rng.normal(size=(T, r)) @ rng.normal(size=(r, n))
    if kind == "ill_conditioned":  # norms over twelve orders of magnitude
        return rng.normal(size=(T, n)) * np.logspace(-6, 6, T)[:, None]
    if kind == "with_zero":
        J = rng.normal(size=(T, n))
        J[T // 2] = 0
        return J
    raise ValueError(kind)


def min_norm_point(J: np.ndarray) -> np.ndarray:
    """min ‖Jᵀw‖ over the simplex from the vectors: NNLS on [Jᵀ; 1ᵀ] u ≈ [0; 1], w = u / 1ᵀu."""
    u, _ = nnls(np.vstack([J.T, np.ones(J.shape[0])]), np.r_[np.zeros(J.shape[1]), 1.0])
    return (u / u.sum()) @ J


KINDS = ["random", "half_opposed", "rank_deficient", "ill_conditioned", "with_zero"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [2, 3, 5, 8, 12])
def test_enumeration_is_the_exact_min_norm_point(kind, T):
    for seed in range(4):
        J = jacobian(kind, T, seed)
        G = torch.from_numpy(J @ J.T)
        w = min_norm_weights_on_device(G).numpy()
        scale = float(np.max(np.diag(J @ J.T)))
        assert w.shape == (T,) and (w >= 0).all() and abs(w.sum() - 1) < 1e-12
        d = w @ J
        # KKT of min_{w ∈ simplex} wᵀGw: every gradient has <g_t, d> ≥ ‖d‖² (equality on the support).
        assert (J @ d >= d @ d - 1e-9 * scale).all()
        # The same point as an independent solver on the vectors, and as the host active-set solver.
        ref = min_norm_point(J) if kind != "ill_conditioned" else (MGDA()(G).numpy() @ J)
        assert np.linalg.norm(d - ref) <= 1e-6 * np.sqrt(scale)
        assert d @ d <= float(MGDA()(G).numpy() @ (J @ J.T) @ MGDA()(G).numpy()) + 1e-12 * scale


def test_degenerate_grams():
    assert torch.equal(min_norm_weights_on_device(torch.zeros(3, 3, dtype=torch.float64)), torch.full((3,), 1 / 3, dtype=torch.float64))
    nan = torch.eye(3, dtype=torch.float64)
    nan[1, 1] = float("nan")
    assert torch.isnan(min_norm_weights_on_device(nan)).all(), "a non-finite Gram must give NaN weights, never a direction"
    same = torch.ones(4, 4, dtype=torch.float64)  # identical gradients: any simplex point, same direction
    w = min_norm_weights_on_device(same)
    assert abs(float(w.sum()) - 1) < 1e-12 and (w >= 0).all()
    with pytest.raises(ValueError, match=f"at most {MAX_TASKS} tasks"):
        min_norm_weights_on_device(torch.eye(MAX_TASKS + 1, dtype=torch.float64))


@pytest.mark.parametrize("solver", [MGDA(), MGDA(normalization="l2"), MGDA(normalization="l2", apply_to="raw"), Mean()], ids=repr)
def test_solvers_on_device_give_the_host_direction(solver):
    for T in (2, 4, 7):
        for seed in range(5):
            J = jacobian("half_opposed", T, seed)
            G = torch.from_numpy(J @ J.T)
            assert solver.supports_on_device(T)
            d_device, d_host = solver.weights_on_device(G).numpy() @ J, solver(G).numpy() @ J
            np.testing.assert_allclose(d_device, d_host, rtol=0, atol=1e-9 * np.linalg.norm(J, axis=1).max())


def cagrad_dual(J: np.ndarray, w: np.ndarray, c: float) -> float:
    """CAGrad's dual objective F(w) = ⟨g_w, g0⟩ + c‖g0‖‖g_w‖ at simplex weights w, from the vectors."""
    g0, gw = J.mean(0), w @ J
    return float(gw @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(gw))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("c", [0.2, 0.5, 1.0, 2.0])
def test_cagrad_on_device_is_the_optimum_of_its_dual(kind, c):
    """Against the host solver: the same direction where its Brent search resolves the problem
    (every family but twelve orders of magnitude of gradient norms), and never a higher value of
    the dual objective (computed here from the vectors) anywhere."""
    for T in (2, 3, 5, 8, 12):
        for seed in range(3):
            J = jacobian(kind, T, seed)
            G = torch.from_numpy(J @ J.T)
            device, host = CAGrad(c=c, rescale=0).weights_on_device(G).numpy(), CAGrad(c=c, rescale=0)(G).numpy()
            scale = np.linalg.norm(J, axis=1).max()
            if kind != "ill_conditioned":
                np.testing.assert_allclose(device @ J, host @ J, rtol=0, atol=1e-7 * scale)
            if c >= 1 and np.linalg.norm(min_norm_point(J)) <= 1e-6 * scale:
                # Zero in the hull and c ≥ 1: the minimiser is g_w = 0 (F(x) ≥ (c − 1)‖g0‖‖x‖ ≥ 0) and
                # d is g0's projection onto the dual cone, which conflicts with no gradient; the
                # weights are not g0 + (r/s) g_w, so F cannot be recovered from them.
                assert (J @ (device @ J) >= -1e-9 * scale**2).all(), (T, seed)
                continue
            # d = g0 + (r/s) g_w: recover the simplex weights of g_w.
            moved_d, moved_h = device - 1 / T, host - 1 / T
            if moved_d.sum() > 1e-9 and moved_h.sum() > 1e-9:
                f_d, f_h = cagrad_dual(J, moved_d / moved_d.sum(), c), cagrad_dual(J, moved_h / moved_h.sum(), c)
                assert f_d <= f_h + 1e-9 * scale**2, (T, seed, f_d, f_h)


def test_cagrad_rescale_and_degenerate_cases_on_device():
    J = jacobian("half_opposed", 4, 0)
    G = torch.from_numpy(J @ J.T)
    for rescale in (0, 1, 2):
        torch.testing.assert_close(CAGrad(c=0.5, rescale=rescale).weights_on_device(G), CAGrad(c=0.5, rescale=rescale)(G))
    torch.testing.assert_close(CAGrad(c=0.0).weights_on_device(G), torch.full((4,), 0.25, dtype=torch.float64))
    # c ≥ 1 with zero in the hull: the minimiser is g_w = 0 and d is g0's projection onto the dual
    # cone {d : ⟨g_t, d⟩ ≥ 0}, here {d : d_1 = 0, d_2 ≥ 0}, so d = (0, 1/3, 0) — whatever weights give it.
    J = np.array([[2.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    G = torch.from_numpy(J @ J.T)
    d = CAGrad(c=1.5, rescale=0).weights_on_device(G).numpy() @ J
    np.testing.assert_allclose(d, [0.0, 1 / 3, 0.0], atol=1e-12)
    np.testing.assert_allclose(d, CAGrad(c=1.5, rescale=0)(G).numpy() @ J, atol=1e-12)
    assert torch.isnan(CAGrad().weights_on_device(torch.full((3, 3), float("nan"), dtype=torch.float64))).all()


def test_what_solves_on_the_host():
    assert not MGDA().supports_on_device(MAX_TASKS + 1)
    assert not MGDA(normalization="loss+").supports_on_device(4)  # needs the losses, which live on the host
    assert CAGrad().supports_on_device(MAX_TASKS) and not CAGrad().supports_on_device(MAX_TASKS + 1)
    assert not UPGrad().supports_on_device(4)


class HostReads(TorchDispatchMode):
    """Counts the operators that read a tensor's value on the host (item, bool, int, float)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


class HostTensors(TorchDispatchMode):
    """Records operators that receive a host tensor (beyond a 0-d wrapped scalar): on CUDA, a copy
    from host memory, which waits for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() > 0 for t in flat):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("solver", [MGDA(), MGDA(normalization="l2"), Mean(), CAGrad(), CAGrad(c=2.0)], ids=repr)
def test_on_device_solvers_never_read_a_value_on_the_host(solver):
    """On the meta device every value read raises; the device path runs there from start to end,
    and no operator receives a tensor from host memory."""
    G = torch.empty(6, 6, dtype=torch.float64, device="meta")
    with HostTensors() as host:
        assert solver.weights_on_device(G).shape == (6,)
    assert host.ops == []
    with pytest.raises((RuntimeError, NotImplementedError)):
        MGDA()(G)  # the host solver reads values: the check itself can fail


def test_reduction_without_host_reads(tmp_path):
    """One process, two languages (m = 2 on world size 1): the reducer's device path reads no value on
    the host inside the reduction (the host path does, which shows the counter works), computes the
    host path's combination, and its check after the backward raises for a non-finite bucket."""
    import torch.distributed as dist

    from lightning_moo.buckets import Bucket, ParamRange, Segment
    from lightning_moo.exchange import ShardedExchange
    from lightning_moo.layout import LanguageLayout
    from lightning_moo.reducer import BucketReducer

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        layout = LanguageLayout.build(2, 1)
        bucket = Bucket(0, (ParamRange("a", 0, 30), ParamRange("b", 30, 50)), (Segment(0, 50, 0),))
        rows = torch.from_numpy(jacobian("half_opposed", 2, 0, n=50)).float()
        results = {}
        for on_device in (False, True):
            reducer = BucketReducer(MGDA(), ShardedExchange(), layout, "ZeRO", on_device=on_device)
            reducer.start_step(0)
            tensor = rows[1].clone()
            with HostReads() as reads:
                w = reducer.reduce(tensor, bucket, rows[:1].clone())
            reducer.check_step()
            results[on_device] = (tensor, w, reads.reads, reducer.buckets[0])
        assert results[False][2] > 0 and results[True][2] == 0
        torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-6, atol=1e-7)
        device_record, host_record = results[True][3], results[False][3]
        torch.testing.assert_close(device_record.param_grams, host_record.param_grams)  # dtype and shape too
        torch.testing.assert_close(device_record.gram, host_record.gram)
        torch.testing.assert_close(device_record.weights, host_record.weights, rtol=1e-6, atol=1e-7)
        assert device_record.gram.device.type == "cpu" and device_record.weights.dtype == torch.float64

        reducer = BucketReducer(MGDA(), ShardedExchange(), layout, "ZeRO", on_device=True)
        reducer.start_step(3)
        bad = rows.clone()
        bad[0, 35] = float("nan")  # language 0's gradient of parameter b
        reducer.reduce(bad[1].clone(), bucket, bad[:1].clone())  # no error inside the reduction
        with pytest.raises(FloatingPointError, match=r"ZeRO bucket 0 at step 3 .*language 0: b\.") as error:
            reducer.check_step()
        assert "language 1" not in str(error.value) and "language 0: a" not in str(error.value)

        scaled = BucketReducer(MGDA(), ShardedExchange(), layout, "ZeRO", loss_scaling=True, on_device=True)
        scaled.start_step(0)
        out = bad[1].clone()
        scaled.reduce(out, bucket, bad[:1].clone())
        scaled.check_step()  # fp16 loss scaling: the engine sees NaN and skips; monitoring sees nothing
        assert torch.isnan(out).all() and scaled.buckets == {}
    finally:
        dist.destroy_process_group()
