"""The gradient probe (experiments/probe.py): its buckets against DeepSpeed's rule worked by hand; every
metric of one probe against an independent computation on a tiny Llama (gradients from full logits,
directions built by hand per bucket, the step taken by hand, AdamW's update from torch.optim.AdamW
itself); first-order decreases against finite differences; and the smoke run, resumed."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments import probe
from lightning_moo.data.encoding import Encoder
from lightning_moo.hf import BYTES, load_causal_lm, load_tokenizer
from lightning_moo.module import token_nll
from lightning_moo.solvers import MGDA

ROOT = Path(__file__).resolve().parents[1]
LANGUAGES = ["lat_Smok", "cyr_Smok", "grk_Smok"]
LABELS = ["science/technology", "travel", "politics"]


def test_buckets_follow_deepspeeds_rule_worked_by_hand():
    # Parameters of 5, 3, 4, 10, 2 elements, buckets of 8, backward order 2, 10, 4, 3, 5:
    # {2}: adding 10 would overflow → closed; {10} alone (larger than a bucket); {4, 3} = 7, adding 5
    # would overflow → closed; {5}. Flat offsets 0, 5, 8, 12, 22, 24.
    assert probe.zero_buckets([5, 3, 4, 10, 2], 8) == [(22, 24), (12, 22), (5, 12), (0, 5)]
    assert probe.zero_buckets([5, 3], 100) == [(0, 8)]
    # A bucket that the next parameter fills exactly is not closed yet (DeepSpeed closes on overflow).
    assert probe.zero_buckets([4, 4], 8) == [(0, 8)]
    assert probe.zero_buckets([4, 4, 1], 8) == [(4, 9), (0, 4)]


def test_probe_rows_are_disjoint_and_parallel_rows_are_required(tmp_path):
    train, halves = probe.split_rows(40, 6, 3, 4, seed=1)
    used = train + [i for a, b in halves for i in a + b]
    assert len(used) == len(set(used)) == 6 + 3 * 8 and all(len(a) == len(b) == 4 for a, b in halves)
    with pytest.raises(SystemExit, match="the split has 40"):
        probe.split_rows(40, 10, 4, 4, seed=0)
    for language, ids in (("eng_Latn", [1, 2]), ("rus_Cyrl", [1, 3])):
        (tmp_path / language).mkdir()
        (tmp_path / language / "train.tsv").write_text(
            "index_id\tcategory\ttext\n" + "".join(f"{i}\ttravel\tword {i}\n" for i in ids), encoding="utf-8")
    encoder = Encoder(load_tokenizer(BYTES), prompt_template="{text}", response_template="{category}",
                      label_field="category")
    with pytest.raises(SystemExit, match="not parallel"):
        probe.sib200_rows(tmp_path, ["eng_Latn", "rus_Cyrl"], encoder)
    with pytest.raises(SystemExit, match="no <language>/train.tsv"):
        probe.sib200_rows(tmp_path, ["eng_Latn", "tel_Telu"], encoder)


@pytest.fixture(scope="module")
def tiny():
    """A tiny random Llama, its parameters, and two halves of 2 made-up sentences in 3 languages."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer(BYTES)
    model = load_causal_lm(config={**probe.SMOKE_MODEL, "hidden_size": 16, "intermediate_size": 32},
                           vocab_size=len(tokenizer))
    encoder = Encoder(tokenizer, max_length=128, prompt_template="{text}\nTopic:", response_template=" {category}",
                      label_field="category", labels=LABELS)
    rows = probe.smoke_rows(LANGUAGES, LABELS, count=8)
    halves = [[probe.batch_of(encoder, rows[language][h * 2: h * 2 + 2], language) for language in LANGUAGES]
              for h in range(2)]
    params = [p for p in model.parameters()]
    return model, params, halves


def full_logits_gradient(model, params, batch) -> tuple[torch.Tensor, float]:
    """A language's gradient the way MultilingualLM computes its loss: full logits, token_nll, mean per token."""
    labels = batch["labels"]
    loss = token_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, labels).sum()
    loss = loss / (labels[:, 1:] != -100).sum()
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]), loss.item()


def full_logits_loss(model, batch) -> float:
    with torch.no_grad():
        labels = batch["labels"]
        nll = token_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, labels)
        return (nll.sum() / (labels[:, 1:] != -100).sum()).item()


def test_gradient_and_loss_match_full_logits(tiny):
    model, params, halves = tiny
    out = torch.empty(sum(p.numel() for p in params))
    for batch in halves[0]:
        loss = probe.gradient_into(model, params, batch, out)
        expected, expected_loss = full_logits_gradient(model, params, batch)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)
        assert loss == pytest.approx(expected_loss, rel=1e-6)
        # run_probe takes half B's losses at θ from the backward pass: the no-grad forward must agree.
        assert probe.losses_at(model, [batch])[0] == pytest.approx(loss, rel=1e-6)


def adamw_step(theta: torch.Tensor, gradient: torch.Tensor, lr: float, moments) -> torch.Tensor:
    """The change torch.optim.AdamW itself makes to a flat parameter (weight decay 0, MultilingualLM's betas)."""
    p = torch.nn.Parameter(theta.clone())
    optimizer = torch.optim.AdamW([p], lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    if moments is not None:
        optimizer.state[p] = {"step": torch.tensor(float(moments[2])), "exp_avg": moments[0].clone(),
                              "exp_avg_sq": moments[1].clone()}
    p.grad = gradient.clone()
    optimizer.step()
    return p.detach() - theta


@pytest.mark.parametrize("trained", [False, True])
def test_every_metric_of_a_probe_against_an_independent_computation(tiny, trained):
    model, params, halves = tiny
    T = len(LANGUAGES)
    theta = probe.flatten(params)
    moments = None
    if trained:  # moments from three real AdamW steps on random gradients
        p = torch.nn.Parameter(theta.clone())
        optimizer = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
        for seed in range(3):
            p.grad = torch.randn(theta.shape, generator=torch.Generator().manual_seed(seed))
            optimizer.step()
        state = optimizer.state[p]
        moments = (state["exp_avg"].clone(), state["exp_avg_sq"].clone(), int(state["step"]))
    numels = [p.numel() for p in params]
    buckets = probe.zero_buckets(numels, 3000)
    assert len(buckets) >= 4
    args = argparse.Namespace(sgd_lr=0.05, heldout=probe.HELDOUT, betas=(0.9, 0.95), eps=1e-8)
    result = probe.run_probe(model, params, {"theta": theta, "lr": 1e-3, "moments": moments}, halves, buckets, args,
                             probe=0, status=lambda text: None)
    torch.testing.assert_close(probe.flatten(params), theta, rtol=0, atol=0)  # the parameters are put back

    J = torch.stack([full_logits_gradient(model, params, batch)[0] for half in halves for batch in half]).double()
    base = [full_logits_loss(model, batch) for batch in halves[1]]
    solvers = probe.make_solvers()
    losses_a = torch.tensor(result["losses"]["A"], dtype=torch.float64)

    def direction(name: str, mode: str) -> torch.Tensor:
        """Built by hand: each bucket's own weights (or the whole model's), applied to A's rows there."""
        A = J[:T]
        if mode == "global":
            return solvers[name](A @ A.T, bucket="global", step=0, losses=losses_a) @ A
        d = torch.zeros(J.shape[1], dtype=torch.float64)
        for b, (s, e) in enumerate(buckets):
            d[s:e] = solvers[name](A[:, s:e] @ A[:, s:e].T, bucket=b, step=0, losses=losses_a) @ A[:, s:e]
        return d

    def cos(u: torch.Tensor, v: torch.Tensor) -> float:
        return float(u @ v / (u.norm() * v.norm()))

    d_mean = direction("mean", "bucket")
    eta = 0.05 * float(d_mean.norm())
    assert result["eta"] == pytest.approx(eta, rel=1e-5)
    assert set(result["directions"]) == {f"{s}/{m}" for s in solvers for m in probe.MODES} - {"mean/global"}
    for key, entry in result["directions"].items():
        name, mode = key.split("/")
        d = direction(name, mode)
        assert entry["norm"] == pytest.approx(float(d.norm()), rel=1e-4)
        torch.testing.assert_close(torch.tensor(entry["decrease"], dtype=torch.float64), J @ d, rtol=1e-4,
                                   atol=1e-4 * float(J.norm(dim=1).max() * d.norm()))
        assert entry["cos_mean"] == pytest.approx(cos(d, d_mean), abs=1e-4)
        own_global = d_mean if name == "mean" else direction(name, "global")
        assert entry["cos_global"] == pytest.approx(cos(d, own_global), abs=1e-4)
        if key in probe.HELDOUT:
            step = (theta.double() - eta * d / d.norm()).float()
            probe.set_params(params, step)
            changes = [full_logits_loss(model, batch) - b for batch, b in zip(halves[1], base)]
            probe.set_params(params, theta)
            assert entry["heldout_change"] == pytest.approx(changes, rel=1e-3, abs=1e-5)
        else:
            assert entry["heldout_change"] is None
        for variant, gradient in (("adam", d * float(d_mean.norm() / d.norm())), ("adam_raw", d)):
            update = adamw_step(theta, gradient.float(), 1e-3, moments).double()
            assert entry[variant]["norm"] == pytest.approx(float(update.norm()), rel=1e-4)
            torch.testing.assert_close(torch.tensor(entry[variant]["decrease"], dtype=torch.float64), -(J @ update),
                                       rtol=1e-3, atol=1e-3 * float(J.norm(dim=1).max() * update.norm()))
    momentum = adamw_step(theta, torch.zeros_like(theta), 1e-3, moments).double()
    torch.testing.assert_close(torch.tensor(result["momentum"]["decrease"], dtype=torch.float64), -(J @ momentum),
                               rtol=1e-3, atol=1e-6 + 1e-3 * float(J.norm(dim=1).max() * momentum.norm()))

    # The noise ceiling: cosines of the explicit gradients, whole model and per bucket.
    for where, (s, e) in [("model", (0, J.shape[1])), *((b, bucket) for b, bucket in enumerate(buckets))]:
        noise = result["noise"]["model"] if where == "model" else result["noise"]["buckets"][where]
        G = J[:, s:e]
        assert noise["within"] == pytest.approx([cos(G[t], G[T + t]) for t in range(T)], abs=1e-5)
        pairs = [(a, b) for a in range(T) for b in range(T) if a != b]
        assert noise["cross_same"] == pytest.approx([cos(G[a], G[b]) for a, b in pairs], abs=1e-5)
        assert noise["cross_different"] == pytest.approx([cos(G[a], G[T + b]) for a, b in pairs], abs=1e-5)


def test_first_order_decrease_matches_finite_differences(tiny):
    """⟨g_t^B, d⟩/‖d‖ from the Grams against central differences of half B's loss along d."""
    model, params, halves = tiny
    T = len(LANGUAGES)
    theta = probe.flatten(params)
    J = torch.empty(2 * T, theta.numel())
    for h in range(2):
        for t in range(T):
            probe.gradient_into(model, params, halves[h][t], J[h * T + t])
    buckets = probe.zero_buckets([p.numel() for p in params], 3000)
    grams = probe.bucket_grams(J, buckets)
    w = torch.cat([probe.solve(MGDA(normalization="l2"), grams[:, :T, :T], None, "bucket", 0),
                   torch.zeros(len(buckets), T, dtype=torch.float64)], 1)
    norm = math.sqrt(probe.inner(grams, w, w))
    predicted = (probe.row_dots(grams, w) / norm)[T:]
    d = probe.materialize(J, buckets, w, torch.empty_like(theta))
    h = 1e-2
    probe.set_params(params, theta, d, -h / norm)
    down = probe.losses_at(model, halves[1])
    probe.set_params(params, theta, d, h / norm)
    up = probe.losses_at(model, halves[1])
    probe.set_params(params, theta)
    measured = torch.tensor([(u - l) / (2 * h) for u, l in zip(up, down)], dtype=torch.float64)
    torch.testing.assert_close(measured, predicted, rtol=2e-2, atol=2e-3)
    assert predicted.abs().min() > 0.05  # a decrease that differences can resolve, not a vacuous match


def test_smoke_run_finishes_resumes_and_refuses_other_settings(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    command = [sys.executable, "-m", "experiments.probe", "--smoke", "--out", str(out), "--cache", str(cache)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    files = sorted(p.name for p in out.glob("*.json"))
    assert files == ["mean2_probe00.json", "mean2_probe01.json", "untrained_probe00.json", "untrained_probe01.json"]
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    trained = json.loads((out / "mean2_probe00.json").read_text())
    untrained = json.loads((out / "untrained_probe00.json").read_text())
    # The two states differ (the Mean steps moved the model), and both saw the same sentences.
    assert trained["sentences"] == untrained["sentences"] and trained["losses"] != untrained["losses"]
    summary = (out / "summary.md").read_text()
    assert "## State `untrained` (2 probes)" in summary and "## State `mean2` (2 probes)" in summary

    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")} == first  # nothing recomputed

    refused = subprocess.run([*command, "--sgd-lr", "0.5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "other settings" in refused.stderr
