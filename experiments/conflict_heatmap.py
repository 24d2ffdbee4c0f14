"""Train a tiny random Llama on four synthetic "languages" with bucket-level MGDA and draw the conflict.

    python experiments/conflict_heatmap.py [--steps 40] [--languages 4] [--out docs/img]

One CPU process per language (gloo), DeepSpeed ZeRO-2 with small buckets, ConflictMonitor logging
to TensorBoard under lightning_logs/conflict_heatmap/. At the end rank zero saves the last step's
heatmaps: ``<out>/conflict_heatmap.png`` (bucket × language pair) and ``<out>/conflict_languages.png``
(whole-model language × language cosines). Takes about a minute on two cores.

Each language is a bigram process over one shared vocabulary whose transition table is partly shared
with the other languages and partly its own, so the languages' gradients partly agree and partly
conflict.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_moo.callbacks import ConflictMonitor
from lightning_moo.callbacks.conflict_figures import bucket_pair_figure, language_cosine_figure
from lightning_moo.callbacks.conflict_monitor import in_model_order, language_names
from lightning_moo import metrics
from lightning_moo.solvers import MGDA
from lightning_moo.strategies import BucketMOOStrategy

VOCAB, SEQ, BATCH = 64, 32, 8
NAMES = ["en", "de", "zh", "sw"]


def bigram_batch(language: int, step: int) -> torch.Tensor:
    """Token ids of ``BATCH`` sequences from language ``language``'s own random bigram table."""
    # Peaked transition tables: a part every language shares plus the language's own.
    shared = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(99))
    own = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(100 + language))
    transitions = torch.softmax(3.0 * (0.6 * shared + 0.8 * own), dim=1)
    gen = torch.Generator().manual_seed(10_000 * language + step)
    tokens = torch.empty(BATCH, SEQ, dtype=torch.long)
    tokens[:, 0] = torch.randint(VOCAB, (BATCH,), generator=gen)
    for i in range(1, SEQ):
        tokens[:, i] = torch.multinomial(transitions[tokens[:, i - 1]], 1, generator=gen).squeeze(1)
    return tokens


class TinyLM(pl.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        torch.manual_seed(0)  # identical initial weights on every rank
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ, tie_word_embeddings=False,
        )
        self.model = LlamaForCausalLM(config)
        self.lr = lr

    def training_step(self, _, batch_idx):
        tokens = bigram_batch(self.global_rank, self.trainer.global_step)
        return self.model(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--languages", type=int, default=4, choices=range(2, len(NAMES) + 1))
    p.add_argument("--bucket", type=int, default=2500, help="reduce_bucket_size in elements")
    p.add_argument("--out", type=Path, default=Path("docs/img"))
    args = p.parse_args()

    strategy = BucketMOOStrategy(
        solver=MGDA(), languages=NAMES[: args.languages], stage=2, reduce_bucket_size=args.bucket,
        overlap_comm=False, logging_batch_size_per_gpu=1,
    )
    module = TinyLM(lr=3e-3)
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.languages, strategy=strategy, max_steps=args.steps,
        callbacks=[ConflictMonitor(log_every_n_steps=1, image_every_n_steps=10)],
        logger=TensorBoardLogger("lightning_logs", name="conflict_heatmap"),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
    )
    trainer.fit(module, DataLoader(range(args.steps), batch_size=None))
    if trainer.is_global_zero:
        buckets = list(trainer.strategy.buckets.values())
        names = language_names(trainer.strategy, args.languages)
        args.out.mkdir(parents=True, exist_ok=True)
        ordered = in_model_order(buckets, [n for n, _ in module.named_parameters()])
        bucket_pair_figure(ordered, names).savefig(args.out / "conflict_heatmap.png")
        cos = metrics.cosine_matrix(metrics.sum_grams(b.gram for b in buckets))
        language_cosine_figure(cos, names).savefig(args.out / "conflict_languages.png")
        print(f"step {buckets[0].step}: {len(buckets)} buckets; saved {args.out}/conflict_heatmap.png and conflict_languages.png")


if __name__ == "__main__":
    main()
