"""Language-specific FFN neurons by LAPE (language activation probability entropy, Tang et al. 2024).

A neuron of a gated MLP (``down(act(gate(x)) * up(x))``, as in Llama, Qwen, Mistral) is active on a
token when ``act(gate(x)) > 0``. Its activation probability per language, normalised over languages,
gives an entropy: low entropy means the neuron fires for few languages. Neurons that exceed the
``quantile`` activation probability in some language are candidates; the ``top_share`` of all neurons
with the lowest entropy among them are language-specific (or, with ``entropy_threshold``, every
candidate whose entropy is at most that many nats: then the number of language-specific neurons is a
measurement, which a fixed share can never be), each assigned to the languages in which its
probability exceeds that threshold.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from lightning.pytorch import LightningModule, Trainer
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import nn

from lightning_moo.data.parallel import encode_batches
from lightning_moo.hf import find_causal_lm
from lightning_moo.tensorboard import log_figure, log_scalars, output_dir

from .analysis import TextAnalysisCallback, batch_count, progress


def gated_mlps(model: nn.Module) -> list[nn.Module]:
    """The gated MLP blocks of ``model`` in layer order (modules with gate_proj, up_proj, down_proj
    and act_fn)."""
    found = [
        module
        for module in model.modules()
        if all(isinstance(getattr(module, name, None), nn.Linear) for name in ("gate_proj", "up_proj", "down_proj"))
        and callable(getattr(module, "act_fn", None))
    ]
    if not found:
        raise TypeError(
            f"{type(model).__name__} has no gated MLP: LAPE needs MLP blocks with gate_proj, up_proj, "
            "down_proj and act_fn (Llama-, Qwen-, Mistral-style), where a neuron is active when "
            "act_fn(gate_proj(x)) > 0"
        )
    return found


@torch.no_grad()
def activation_probabilities(
    model: nn.Module,
    tokenizer,
    texts: Mapping[str, Sequence[str]],
    batch_size: int = 8,
    max_length: int = 128,
    show_progress: bool = False,
) -> torch.Tensor:
    """P(act_fn(gate_proj(x)) > 0) over the non-padding tokens of each language's texts, as a float64
    tensor [layers, neurons, languages] (languages in the order of ``texts``)."""
    mlps = gated_mlps(model)
    device = next(model.parameters()).device
    widths = {mlp.gate_proj.out_features for mlp in mlps}
    if len(widths) != 1:
        raise ValueError(f"gated MLPs of different widths {sorted(widths)} are not supported")
    counts = torch.zeros(len(mlps), widths.pop(), len(texts), dtype=torch.float64, device=device)
    state: dict[str, object] = {}  # the batch's mask and language, read by the hooks

    def hook_for(layer: int, mlp: nn.Module):
        def hook(_module, _inputs, gate_out):
            active = (mlp.act_fn(gate_out) > 0) & state["mask"]
            counts[layer, :, state["language"]] += active.sum(dim=(0, 1), dtype=torch.float64)

        return hook

    handles = [mlp.gate_proj.register_forward_hook(hook_for(i, mlp)) for i, mlp in enumerate(mlps)]
    tokens = torch.zeros(len(texts), dtype=torch.float64, device=device)
    # The decoder stack alone: the LM head's vocabulary-sized logits are not needed here.
    decoder = getattr(model, "base_model", model)
    try:
        with progress(batch_count(texts, batch_size), "LAPE", show_progress) as bar:
            for language, sentences in enumerate(texts.values()):
                for input_ids, mask in encode_batches(tokenizer, sentences, batch_size, max_length, device):
                    state["mask"], state["language"] = mask.bool().unsqueeze(-1), language
                    decoder(input_ids=input_ids, attention_mask=mask)
                    tokens[language] += mask.sum()
                    bar.update()
    finally:
        for handle in handles:
            handle.remove()
    return (counts / tokens).cpu()


@dataclass
class LanguageNeurons:
    languages: list[str]
    probabilities: torch.Tensor  # [layers, neurons, languages]
    entropy: torch.Tensor  # [layers, neurons], LAPE of every neuron
    threshold: float  # activation probability a neuron must exceed in some language
    selected: torch.Tensor  # [layers, neurons] bool, the language-specific neurons
    assignment: torch.Tensor  # [layers, neurons, languages] bool, selected and above threshold

    def neuron_sets(self) -> dict[str, list[list[int]]]:
        """Language -> per layer, the indices of its specific neurons."""
        return {
            lang: [torch.nonzero(per_layer[:, j]).flatten().tolist() for per_layer in self.assignment]
            for j, lang in enumerate(self.languages)
        }


def select_language_neurons(
    probabilities: torch.Tensor, languages: Sequence[str], top_share: float = 0.01, quantile: float = 0.95,
    entropy_threshold: float | None = None,
) -> LanguageNeurons:
    """LAPE selection from activation probabilities [layers, neurons, languages]: the ``top_share`` of
    all neurons with the lowest entropy among the candidates, or, with ``entropy_threshold`` (nats),
    every candidate whose entropy is at most that."""
    probs = probabilities.to(torch.float64)
    totals = probs.sum(dim=-1, keepdim=True)
    # A neuron that never fires has no distribution over languages; it gets entropy 0 here and is
    # kept out by the threshold below, as in the reference implementation.
    normed = torch.where(totals > 0, probs / totals.clamp_min(torch.finfo(probs.dtype).tiny), 0.0)
    entropy = -(normed * torch.where(normed > 0, normed.log(), 0.0)).sum(dim=-1)
    flat = probs.flatten()
    threshold = flat.kthvalue(max(1, round(flat.numel() * quantile))).values.item()
    above = probs > threshold
    candidate = above.any(dim=-1)
    if entropy_threshold is not None:
        selected = candidate & (entropy <= entropy_threshold)
    else:
        keep = min(round(entropy.numel() * top_share), int(candidate.sum()))
        ranked = torch.where(candidate, entropy, torch.inf).flatten()
        selected = torch.zeros(entropy.numel(), dtype=torch.bool)
        selected[ranked.topk(keep, largest=False).indices] = True
        selected = selected.view_as(entropy)
    return LanguageNeurons(
        languages=list(languages),
        probabilities=probs,
        entropy=entropy,
        threshold=threshold,
        selected=selected,
        assignment=above & selected.unsqueeze(-1),
    )


def neuron_metrics(result: LanguageNeurons) -> dict[str, float]:
    """Scalars: share of language-specific neurons per layer and in total, neurons per language."""
    per_layer = result.selected.sum(dim=1).double() / result.selected.shape[1]
    metrics = {f"neurons/layer_{i}/ratio": value.item() for i, value in enumerate(per_layer)}
    metrics["neurons/total/ratio"] = result.selected.double().mean().item()
    for j, lang in enumerate(result.languages):
        metrics[f"neurons/{lang}/count"] = float(result.assignment[..., j].sum())
    return metrics


def per_layer_chart(result: LanguageNeurons) -> Figure:
    """Stacked bars: per layer, how many neurons are specific to each language (a neuron assigned to
    several languages counts in each)."""
    counts = result.assignment.sum(dim=1).numpy()  # [layers, languages]
    figure = Figure(figsize=(max(6.0, 0.35 * counts.shape[0] + 2) + 1.5, 4), dpi=100)
    axes = figure.add_subplot()
    # tab10 repeats after ten languages; tab20 keeps up to twenty stacked bars apart.
    palette = colormaps["tab10" if counts.shape[1] <= 10 else "tab20"]
    bottom = 0
    for j, lang in enumerate(result.languages):
        axes.bar(range(counts.shape[0]), counts[:, j], bottom=bottom, label=lang, color=palette(j % palette.N))
        bottom = bottom + counts[:, j]
    axes.set_xlabel("layer")
    axes.set_ylabel("language-specific neurons")
    axes.set_title(f"LAPE: lowest-entropy neurons above p={result.threshold:.3f}")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    return figure


class NeuronSpecificity(TextAnalysisCallback):
    """Finds language-specific FFN neurons (LAPE) of the wrapped Hugging Face model and logs them.

    Args:
        texts: {language: sentences}, or a directory laid out as ``<dir>/<lang>/<split>.tsv``.
        tokenizer: a tokenizer, or a local directory to load one from; default ``pl_module.tokenizer``.
        languages, split, max_sentences: which texts to read from a directory (and how many).
        top_share: share of all neurons kept as language-specific (lowest entropy first).
        entropy_threshold: instead of ``top_share``, keep every candidate whose LAPE is at most this
            many nats (0: fires in one language only; ln(languages): uniformly in all). Then
            ``neurons/total/ratio`` measures how many neurons are language-specific, so runs can be
            compared on it.
        quantile: activation-probability quantile a neuron must exceed in some language.
        run_at: any of "fit_start", "validation_end", "fit_end".

    Logs ``neurons/layer_<i>/ratio``, ``neurons/total/ratio``, ``neurons/<lang>/count``, the image
    ``neurons/per_layer``, and saves ``language_neurons/step_<global step>.pt`` in the log directory.
    """

    def __init__(
        self,
        texts: Mapping[str, Sequence[str]] | str | os.PathLike,
        tokenizer=None,
        languages: Sequence[str] | None = None,
        split: str = "dev",
        max_sentences: int | None = 100,
        batch_size: int = 8,
        max_length: int = 128,
        top_share: float = 0.01,
        quantile: float = 0.95,
        run_at: Sequence[str] = ("fit_start", "fit_end"),
        entropy_threshold: float | None = None,
    ):
        if not 0 < top_share <= 1 or not 0 < quantile < 1:
            raise ValueError(f"need 0 < top_share <= 1 and 0 < quantile < 1, got {top_share}, {quantile}")
        if entropy_threshold is not None and entropy_threshold < 0:
            raise ValueError(f"entropy_threshold is an entropy in nats, at least 0; got {entropy_threshold}")
        super().__init__(texts, tokenizer, languages, split, max_sentences, batch_size, max_length, run_at)
        self.top_share, self.quantile, self.entropy_threshold = top_share, quantile, entropy_threshold
        self.last_result: LanguageNeurons | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Fails before training starts: a model without gated MLPs, no tokenizer, malformed texts.
        gated_mlps(find_causal_lm(pl_module))
        super().setup(trainer, pl_module, stage)

    def measure(self, trainer: Trainer) -> LanguageNeurons:
        probs = activation_probabilities(
            self.model, self.tokenizer, self.texts, self.batch_size, self.max_length,
            show_progress=trainer.progress_bar_callback is not None,
        )
        result = select_language_neurons(probs, list(self.texts), self.top_share, self.quantile, self.entropy_threshold)
        log_scalars(trainer, neuron_metrics(result))
        log_figure(trainer, "neurons/per_layer", per_layer_chart(result))
        target = output_dir(trainer) / "language_neurons" / f"step_{trainer.global_step}.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "languages": result.languages,
                "threshold": result.threshold,
                "top_share": self.top_share,
                "entropy_threshold": self.entropy_threshold,
                "quantile": self.quantile,
                "neurons": result.neuron_sets(),
                "probabilities": result.probabilities,
                "entropy": result.entropy,
            },
            target,
        )
        self.last_result = result
        return result
