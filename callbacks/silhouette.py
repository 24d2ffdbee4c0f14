"""How far apart the languages sit in the model's representations, layer by layer.

Each sentence becomes the mean of its hidden states over its real (non-padding) tokens at every layer;
the silhouette score of those vectors, labelled by language, is near 1 when languages form separate
clusters and near 0 (or below) when parallel sentences from different languages mix, i.e. when the
layer represents meaning more than language.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from matplotlib.figure import Figure
from sklearn.metrics import silhouette_score
from torch import nn

from lightning_moo.data.parallel import encode_batches
from lightning_moo.tensorboard import log_figure, log_scalars, tensorboard_writer

from .analysis import TextAnalysisCallback, batch_count, progress

METRICS = ("cosine", "euclidean")


@torch.no_grad()
def pooled_hidden_states(
    model: nn.Module,
    tokenizer,
    texts: Mapping[str, Sequence[str]],
    batch_size: int = 8,
    max_length: int = 128,
    show_progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean-pooled hidden states [layers + 1, sentences, hidden] (index 0 is the embedding output,
    as in ``output_hidden_states``) and the language label of each sentence."""
    device = next(model.parameters()).device
    pooled: list[torch.Tensor] = []
    labels: list[int] = []
    # The decoder stack alone: the LM head's vocabulary-sized logits are not needed here.
    decoder = getattr(model, "base_model", model)
    with progress(batch_count(texts, batch_size), "silhouette", show_progress) as bar:
        for language, sentences in enumerate(texts.values()):
            for input_ids, mask in encode_batches(tokenizer, sentences, batch_size, max_length, device):
                states = decoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
                weights = mask.unsqueeze(-1).to(torch.float32)
                stacked = torch.stack([s.to(torch.float32) for s in states])  # [layers + 1, batch, tokens, hidden]
                pooled.append(((stacked * weights).sum(dim=2) / weights.sum(dim=1)).cpu())
                labels.extend([language] * input_ids.shape[0])
                bar.update()
    return torch.cat(pooled, dim=1).numpy(), np.asarray(labels)


def silhouette_per_layer(features: np.ndarray, labels: np.ndarray) -> dict[str, list[float]]:
    """Silhouette score of every layer's features for each metric."""
    return {metric: [float(silhouette_score(layer, labels, metric=metric)) for layer in features] for metric in METRICS}


def silhouette_curve(scores: Mapping[str, Sequence[float]]) -> Figure:
    figure = Figure(figsize=(6, 4), dpi=100)
    axes = figure.add_subplot()
    for metric, values in scores.items():
        axes.plot(range(len(values)), values, marker="o", label=metric)
    axes.axhline(0.0, color="grey", linewidth=0.8)
    axes.set_xlabel("layer (0 = embeddings)")
    axes.set_ylabel("silhouette by language")
    axes.set_ylim(-1.0, 1.0)
    axes.legend()
    figure.tight_layout()
    return figure


class Silhouette(TextAnalysisCallback):
    """Logs the per-layer silhouette of languages in the wrapped Hugging Face model's hidden states.

    Args:
        texts: {language: sentences} (parallel: position k is the same sentence in every language), or
            a directory laid out as ``<dir>/<lang>/<split>.tsv``.
        tokenizer: a tokenizer, or a local directory to load one from; default ``pl_module.tokenizer``.
        languages, split, max_sentences: which texts to read from a directory (and how many).
        projector_layers: hidden-state indices (0 = embeddings, negative from the end) to send to the
            TensorBoard embedding projector; default the middle layer.
        run_at: any of "fit_start", "validation_end", "fit_end".

    Logs ``silhouette/<metric>/layer_<i>`` for metric in cosine, euclidean, the image
    ``silhouette/curve``, and projector embeddings tagged ``silhouette/layer_<i>``.
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
        projector_layers: Sequence[int] | None = None,
        run_at: Sequence[str] = ("fit_start", "validation_end"),
    ):
        super().__init__(texts, tokenizer, languages, split, max_sentences, batch_size, max_length, run_at)
        self.projector_layers = projector_layers
        self.last_scores: dict[str, list[float]] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        count = self.model.config.num_hidden_layers + 1  # hidden states: embeddings, then each layer
        chosen = [count // 2] if self.projector_layers is None else list(self.projector_layers)
        for layer in chosen:
            if not -count <= layer < count:
                raise ValueError(f"projector layer {layer} out of range for {count} hidden states")
        self.projected = sorted({layer % count for layer in chosen})

    def measure(self, trainer: Trainer) -> dict[str, list[float]]:
        features, labels = pooled_hidden_states(
            self.model, self.tokenizer, self.texts, self.batch_size, self.max_length,
            show_progress=trainer.progress_bar_callback is not None,
        )
        scores = silhouette_per_layer(features, labels)
        log_scalars(
            trainer,
            {f"silhouette/{metric}/layer_{i}": value for metric, values in scores.items() for i, value in enumerate(values)},
        )
        log_figure(trainer, "silhouette/curve", silhouette_curve(scores))
        self._project(trainer, features, labels)
        self.last_scores = scores
        return scores

    def _project(self, trainer: Trainer, features: np.ndarray, labels: np.ndarray) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        names = list(self.texts)
        # Position within its language: with parallel texts, the same number is the same sentence.
        positions = np.concatenate([np.arange(len(s)) for s in self.texts.values()])
        metadata = [[names[label], str(position)] for label, position in zip(labels, positions)]
        for index in self.projected:
            writer.add_embedding(
                torch.from_numpy(features[index]),
                metadata=metadata,
                metadata_header=["language", "sentence"],
                tag=f"silhouette/layer_{index}",
                global_step=trainer.global_step,
            )
