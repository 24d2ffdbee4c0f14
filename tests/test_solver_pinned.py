"""Values computed by hand for small cases, and the documented degenerate behaviour."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lightning_moo.solvers import BUILTIN, MGDA, AlignedMTL, CAGrad, DualProj, IMTLG, NashMTL, PCGrad, UPGrad

ALL = [cls for cls in BUILTIN if cls.uses_gram]  # every built-in Gram solver, default configuration


def gram(*rows):
    J = torch.tensor(rows, dtype=torch.float64)
    return J, J @ J.T


# g1 = (2, 0), g2 = (0, 1): orthogonal, norms 2 and 1.
J_ORTH, G_ORTH = gram([2.0, 0.0], [0.0, 1.0])
# g1 = (1, 0), g2 = (-1, 1): <g1, g2> = -1, a conflict.
J_CONF, G_CONF = gram([1.0, 0.0], [-1.0, 1.0])


def test_mgda_two_orthogonal_gradients():
    # γ = (G22 − G12) / (G11 + G22 − 2 G12) = 1/5 → w = (0.2, 0.8), d = (0.4, 0.8); ⟨d, g1⟩ = ⟨d, g2⟩ = 0.8.
    assert_close(MGDA()(G_ORTH), torch.tensor([0.2, 0.8], dtype=torch.float64))


def test_mgda_three_unit_axes():
    # e1, e2, e3: by symmetry w = 1/3 each, d = (1/3, 1/3, 1/3), ‖d‖² = 1/3.
    assert_close(MGDA()(torch.eye(3, dtype=torch.float64)), torch.full((3,), 1 / 3, dtype=torch.float64))


def test_mgda_l2_normalization():
    # Unit gradients e1, e2 → w' = (1/2, 1/2); weights on the originals w'_t / ‖g_t‖ = (1/4, 1/2).
    assert_close(MGDA("l2")(G_ORTH), torch.tensor([0.25, 0.5], dtype=torch.float64))


def test_cagrad_orthogonal_unit_gradients():
    # g0 = (1/2, 1/2), ‖g0‖ = 1/√2, c‖g0‖ = 0.5/√2. ⟨g_w, g0⟩ = 1/2 for all w, so the minimiser of
    # ‖g_w‖ is w = (1/2, 1/2), ‖g_w‖ = 1/√2, λ = c‖g0‖/‖g_w‖ = 1/2: d = g0 + g_w/2 = 1.5 g0 →
    # weights (0.75, 0.75), rescale=1 divides by 1 + c² = 1.25 → (0.6, 0.6); rescale=2 by 1.5.
    G = torch.eye(2, dtype=torch.float64)
    assert_close(CAGrad()(G), torch.tensor([0.6, 0.6], dtype=torch.float64))
    assert_close(CAGrad(rescale=0)(G), torch.tensor([0.75, 0.75], dtype=torch.float64))
    assert_close(CAGrad(rescale=2)(G), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_pcgrad_two_conflicting_gradients():
    # pc1 = g1 − (⟨g1,g2⟩/‖g2‖²) g2 = g1 + g2/2; pc2 = g2 − (⟨g2,g1⟩/‖g1‖²) g1 = g2 + g1.
    # Sum: 2 g1 + 1.5 g2 → (2, 1.5) whatever the order.
    assert_close(PCGrad()(G_CONF), torch.tensor([2.0, 1.5], dtype=torch.float64))
    assert_close(PCGrad(reduction="mean")(G_CONF), torch.tensor([1.0, 0.75], dtype=torch.float64))


def test_imtlg_two_orthogonal_gradients():
    # Gα ∝ n = (2, 1): α ∝ (2/4, 1/1) = (1/2, 1) → (1/3, 2/3); d = (2/3, 2/3) projects 2/3 on both units.
    assert_close(IMTLG()(G_ORTH), torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))


def test_upgrad_two_conflicting_gradients():
    # Projection of g1 onto {x: ⟨x,g1⟩ ≥ 0, ⟨x,g2⟩ ≥ 0}: g1 + g2/2 = (1/2, 1/2) → v1 = (1, 1/2).
    # Projection of g2: g2 + g1 = (0, 1) → v2 = (1, 1). Mean: (1, 3/4).
    assert_close(UPGrad()(G_CONF), torch.tensor([1.0, 0.75], dtype=torch.float64))


def test_dualproj_keeps_a_non_conflicting_mean():
    # Mean of g1, g2 = (0, 1/2): ⟨·, g1⟩ = 0, ⟨·, g2⟩ = 1/2, already in the dual cone.
    assert_close(DualProj()(G_CONF), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_aligned_mtl_two_orthogonal_gradients():
    # Eigenvalues 4 and 1 with the axes as eigenvectors; σ = √1: w = (1/√4, 1/√1) = (1/2, 1), d = (1, 1).
    assert_close(AlignedMTL()(G_ORTH), torch.tensor([0.5, 1.0], dtype=torch.float64))


def test_nash_mtl_two_orthogonal_gradients():
    # Gram / ‖G‖_F = diag(4, 1)/√17; α_t (G α)_t = 1 → α_t = 17^{1/4} / ‖g_t‖ = 17^{1/4} (1/2, 1).
    assert_close(NashMTL()(G_ORTH), 17**0.25 * torch.tensor([0.5, 1.0], dtype=torch.float64))


def test_nash_mtl_reuses_weights_between_updates_and_checkpoints_them():
    solver = NashMTL(update_weights_every=2)
    first = solver(G_ORTH, bucket="b", step=0)
    assert_close(solver(G_CONF, bucket="b", step=1), first)  # reused
    assert not torch.allclose(solver(G_CONF, bucket="b", step=2), first)  # recomputed
    restored = NashMTL(update_weights_every=2)
    restored.load_state_dict(solver.state_dict())
    assert_close(restored(G_ORTH, bucket="b", step=3), solver(G_ORTH, bucket="b", step=3))


# --- documented degenerate behaviour ------------------------------------------------------------

def direction(J, w):
    return w.to(J.dtype) @ J


@pytest.mark.parametrize("cls", ALL)
def test_single_task_keeps_its_gradient_direction(cls):
    J, G = gram([3.0, -4.0])
    d = direction(J, cls()(G))
    assert torch.linalg.vector_norm(d) > 0 and math.isclose(float(d @ J[0]) / (d.norm() * J[0].norm()), 1.0, rel_tol=1e-12)


@pytest.mark.parametrize("cls", ALL)
def test_all_zero_gradients_give_finite_weights_and_zero_direction(cls):
    w = cls()(torch.zeros(4, 4, dtype=torch.float64))
    assert torch.isfinite(w).all() and w.shape == (4,)


@pytest.mark.parametrize("cls", ALL)
def test_identical_gradients_move_along_them(cls):
    J, G = gram([1.0, 2.0], [1.0, 2.0], [1.0, 2.0])
    d = direction(J, cls()(G))
    assert float(d @ J[0]) > 0 and abs(float(d[0] * J[0, 1] - d[1] * J[0, 0])) < 1e-12


@pytest.mark.parametrize("cls", ALL)
def test_exactly_opposed_gradients_cancel(cls):
    # g and −g with equal norms: no direction helps both; every method returns d = 0.
    J, G = gram([1.0, 2.0], [-1.0, -2.0])
    assert torch.linalg.vector_norm(direction(J, cls()(G))) < 1e-12


@pytest.mark.parametrize("cls", [MGDA, NashMTL])
def test_one_zero_gradient_is_pareto_stationary(cls):
    # A zero gradient lies in the hull: MGDA's min-norm point is 0; Nash-MTL has no bargaining
    # solution and returns no update.
    J, G = gram([1.0, 0.0], [0.0, 0.0], [0.0, 1.0])
    assert torch.linalg.vector_norm(direction(J, cls()(G))) < 1e-12


@pytest.mark.parametrize("cls", [IMTLG, UPGrad, PCGrad, AlignedMTL])
def test_one_zero_gradient_is_ignored_by_the_others(cls):
    J, G = gram([1.0, 0.0], [0.0, 0.0], [0.0, 1.0])
    d = direction(J, cls()(G))
    assert d[0] > 0 and d[1] > 0 and math.isclose(float(d[0]), float(d[1]), rel_tol=1e-9)


@pytest.mark.parametrize("cls", [cls for cls in ALL if cls.scale_invariant])
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_huge_and_tiny_scales_give_the_unit_scale_weights(cls, scale):
    J, G = gram([2.0, 0.0, 1.0], [-1.0, 1.0, 0.5], [0.3, -2.0, 1.0])
    assert_close(cls()(G * scale), cls()(G), rtol=1e-9, atol=0)


@pytest.mark.parametrize("cls", ALL)
def test_rank_deficient_gram(cls):
    # Four gradients in a plane: rank 2.
    J, G = gram([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [-1.0, 0.5, 0.0])
    w = cls()(G)
    assert torch.isfinite(w).all() and abs(float(direction(J, w)[2])) < 1e-12


@pytest.mark.parametrize("cls", ALL)
def test_float32_input_gives_float32_weights(cls):
    w = cls()(G_CONF.float())
    assert w.dtype == torch.float32 and torch.allclose(w.double(), cls()(G_CONF), rtol=1e-5)
