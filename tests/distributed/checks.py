"""Independent recomputations for the proofs: plain autograd on the toy problem, no DeepSpeed."""

from __future__ import annotations

import torch

from toy import loss_fn, make_net


def load(net: torch.nn.Module, params: dict[str, torch.Tensor]) -> torch.nn.Module:
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(params[f"net.{n}"])
    return net


def language_grads(params: dict[str, torch.Tensor], language: int, step: int, replicas: int = 1,
                   lora: bool = False) -> dict[str, torch.Tensor]:
    """Language ``language``'s gradient of the trainable parameters at ``params`` on its batch of
    ``step``; with ``replicas`` k, the mean over the batches of the language's k ranks."""
    net = load(make_net(lora), params)
    loss = sum(loss_fn(net, language, step, j) for j in range(replicas)) / replicas
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in trainable])
    return {f"net.{n}": g for (n, _), g in zip(trainable, grads)}


def single_language_sgd(language: int, steps: int, lr: float, clip: float | None = None) -> dict[str, torch.Tensor]:
    """Plain single-process SGD on one language, optionally clipping the gradient norm."""
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for step in range(steps):
        opt.zero_grad()
        loss_fn(net, language, step).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
    return {f"net.{n}": p.detach().clone() for n, p in net.named_parameters()}


def assert_ranks_identical(results: list[dict]) -> None:
    """Proof 6: every rank holds bit-identical parameters."""
    for r in results[1:]:
        for name, p in results[0]["params"].items():
            assert torch.equal(p, r["params"][name]), f"{name} differs between ranks"


def assert_resumed_equals_straight(straight_ranks: list[dict], resumed_ranks: list[dict]) -> None:
    """A run checkpointed after 2 steps and resumed equals the straight run bit for bit on every rank,
    solver state included: Nash-MTL (``update_weights_every=3``) still reuses step 0's weights at step 2,
    after the resume, and solves afresh at step 3."""
    assert_ranks_identical(resumed_ranks)
    straight, resumed = straight_ranks[0], resumed_ranks[0]
    for name, p in straight["params"].items():
        assert torch.equal(resumed["params"][name], p), name
    for i, b in resumed["buckets"][2].items():
        assert torch.equal(b.weights, straight["buckets"][0][i].weights)
        assert not torch.equal(b.weights, resumed["buckets"][3][i].weights)


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-6) -> None:
    for name in a:
        err = (a[name] - b[name]).abs().max().item()
        scale = b[name].abs().max().item()
        assert err <= rtol * max(scale, 1e-12), f"{name}: max abs difference {err:.3e} (scale {scale:.3e})"


def assert_mgda_per_bucket(thetas, steps_of_buckets, grads_at, lr: float, buckets_per_step: int) -> None:
    """Every step's buckets: the recorded Gram is that of the reference gradients ``grads_at(step)``
    (one dict per language, from plain autograd) on the bucket's parameters, and the applied update
    ``(θ_s − θ_s+1) / lr`` is MGDA of that Gram applied to them."""
    from lightning_moo.solvers import MGDA

    for step, buckets in enumerate(steps_of_buckets):
        grads = grads_at(step)
        assert len(buckets) == buckets_per_step
        for b in buckets.values():
            names = [p.name for p in b.params]
            flat = lambda d: torch.cat([d[n].reshape(-1) for n in names]).double()  # noqa: E731
            g = torch.stack([flat(gr) for gr in grads])
            torch.testing.assert_close(b.gram, g @ g.T, rtol=1e-5, atol=1e-9)
            theta = flat(thetas[step])
            d = (theta - flat(thetas[step + 1])) / lr
            # What fp32 parameters blur in a direction recovered by differencing them.
            atol = 4 * torch.finfo(torch.float32).eps * theta.abs().max().item() / lr
            torch.testing.assert_close(d, MGDA()(g @ g.T) @ g, rtol=1e-4, atol=atol)
