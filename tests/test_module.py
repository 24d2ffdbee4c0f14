"""MultilingualLM against independent computations: Hugging Face's own loss, a per-example loop over
label choices, and a hand-written AdamW step."""

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_moo.module import MultilingualLM, token_nll

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64}
LABELS = ["sports", "travel", "politics"]


def lm_batch(language, texts, prompt_bytes=0, seed=0):
    """Byte-level batch: loss on bytes after ``prompt_bytes`` of each text (+ EOS), right padding."""
    rows = [list(t.encode()) for t in texts]
    width = max(len(r) for r in rows) + 1
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        tokens = torch.tensor([b + 3 for b in r] + [1])  # ByT5: byte b is token b + 3, EOS is 1
        ids[i, : len(tokens)], mask[i, : len(tokens)] = tokens, 1
        labels[i, prompt_bytes : len(tokens)] = tokens[prompt_bytes:]
    num_bytes = torch.tensor([len(r) - prompt_bytes for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "num_bytes": num_bytes, "language": language}


def with_choices(batch, prompts, label_index):
    choices = [lm_batch(batch["language"], [p + " " + label for label in LABELS], prompt_bytes=len(p.encode()))
               for p in prompts]
    width = max(c["input_ids"].shape[1] for c in choices)
    pad = lambda t, v: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
    batch["choice_input_ids"] = torch.stack([pad(c["input_ids"], 0) for c in choices])
    batch["choice_attention_mask"] = torch.stack([pad(c["attention_mask"], 0) for c in choices])
    batch["choice_labels"] = torch.stack([pad(c["labels"], -100) for c in choices])
    batch["label_index"] = torch.tensor(label_index)
    return batch


class FixedData(pl.LightningDataModule):
    """The interface MultilingualLM reads from its DataModule, over hand-made batches."""

    def __init__(self, train, evaluation, seen, labels=None):
        super().__init__()
        self.train, self.evaluation, self.labels = train, evaluation, labels
        self.train_languages = [b["language"] for b in train]
        self.eval_languages = list(evaluation)
        self.seen = set(seen)

    def language_kind(self, language):
        return "seen" if language in self.seen else "unseen"

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=None)

    def val_dataloader(self):
        return [DataLoader(batches, batch_size=None) for batches in self.evaluation.values()]


def trainer(**kwargs):
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_token_nll_matches_a_loop_over_tokens():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :3] = -100
    labels[2, 5:] = -100
    expected = torch.zeros(3)
    for i in range(3):
        for t in range(1, 7):
            if labels[i, t] != -100:
                expected[i] -= torch.log_softmax(logits[i, t - 1], -1)[labels[i, t]]
    torch.testing.assert_close(token_nll(logits, labels), expected)


def test_validation_bits_per_byte_and_accuracy_match_independent_computation():
    pl.seed_everything(0)
    module = MultilingualLM(model_config=TINY)
    prompts = {"deu": ["Das Spiel war", "Die Wahl ist"], "jpn": ["試合は", "選挙は"], "fra": ["Le match", "Le vote"]}
    truth = {"deu": [0, 2], "jpn": [0, 1], "fra": [1, 2]}
    evaluation = {}
    for language, ps in prompts.items():
        texts = [p + " " + LABELS[i] for p, i in zip(ps, truth[language])]
        evaluation[language] = [with_choices(lm_batch(language, texts, prompt_bytes=len(ps[0].encode())), ps, truth[language])]
    data = FixedData([], evaluation, seen=["deu", "jpn"], labels=LABELS)
    metrics = trainer().validate(module, datamodule=data, verbose=False)[0]

    model = module.model.eval()
    expected_acc, expected_bpb = {}, {}
    with torch.no_grad():
        for language, (batch,) in evaluation.items():
            bits, total = 0.0, 0
            for i in range(len(batch["input_ids"])):
                ids, mask = batch["input_ids"][i : i + 1], batch["attention_mask"][i : i + 1]
                labels = batch["labels"][i : i + 1]
                count = int((labels[:, 1:] != -100).sum())
                bits += model(input_ids=ids, attention_mask=mask, labels=labels).loss.item() * count / math.log(2)
                total += int(batch["num_bytes"][i])
            expected_bpb[language] = bits / total
            correct = 0
            for i in range(len(batch["input_ids"])):
                scores = []
                for c in range(len(LABELS)):
                    labels = batch["choice_labels"][i, c : c + 1]
                    n = int((labels[:, 1:] != -100).sum())
                    out = model(input_ids=batch["choice_input_ids"][i, c : c + 1],
                                attention_mask=batch["choice_attention_mask"][i, c : c + 1], labels=labels)
                    scores.append(-out.loss.item() * n)
                correct += int(max(range(len(LABELS)), key=scores.__getitem__) == int(batch["label_index"][i]))
            expected_acc[language] = correct / len(batch["input_ids"])
    for language in prompts:
        assert metrics[f"val/bpb_{language}"] == pytest.approx(expected_bpb[language], rel=1e-5)
        assert metrics[f"val/acc_{language}"] == pytest.approx(expected_acc[language])
    assert metrics["val/bpb_seen"] == pytest.approx((expected_bpb["deu"] + expected_bpb["jpn"]) / 2, rel=1e-5)
    assert metrics["val/bpb_unseen"] == pytest.approx(expected_bpb["fra"], rel=1e-5)
    assert metrics["val/acc_seen"] == pytest.approx((expected_acc["deu"] + expected_acc["jpn"]) / 2)


def test_one_training_step_is_adamw_on_the_hugging_face_loss():
    pl.seed_everything(0)
    module = MultilingualLM(model_config=TINY, lr=1e-2, weight_decay=0.1, warmup_steps=0, schedule="constant")
    batch = lm_batch("deu", ["Guten Morgen", "Wie geht es dir heute?"], prompt_bytes=4)
    reference = MultilingualLM(model_config=TINY)
    reference.model.load_state_dict(module.model.state_dict())
    optimizer = torch.optim.AdamW(reference.model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    loss = reference.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss.backward()
    optimizer.step()

    data = FixedData([batch], {"deu": []}, seen=["deu"])
    trainer(max_steps=1, limit_val_batches=0).fit(module, datamodule=data)
    for (name, p), q in zip(module.model.named_parameters(), reference.model.parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_warmup_then_cosine_schedule_reaches_zero_at_max_steps():
    pl.seed_everything(0)
    module = MultilingualLM(model_config=TINY, lr=0.1, warmup_steps=2, schedule="cosine")
    batches = [lm_batch("deu", ["abc"])] * 6
    data = FixedData(batches, {"deu": []}, seen=["deu"])
    lrs = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer(max_steps=6, limit_val_batches=0, callbacks=[Record()]).fit(module, datamodule=data)
    expected = [0.0, 0.05] + [0.1 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx(expected)


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="exactly one of"):
        MultilingualLM()
    with pytest.raises(ValueError, match="schedule"):
        MultilingualLM(model_config=TINY, schedule="step")


@pytest.mark.parametrize("prompt", ["Topic of: the match ended 2-1.", ""])
def test_choice_nll_with_a_shared_prompt_cache_equals_full_forwards(prompt):
    """Scoring the label continuations from one cached prompt == a full forward per choice (and an
    empty shared prefix, where the choices differ from the first token, takes the full forward)."""
    torch.manual_seed(0)
    module = MultilingualLM(model_config=TINY, tokenizer="bytes").eval()
    batch = with_choices(lm_batch("eng", [prompt]), [prompt], [1])
    ids, mask, labels = (batch[k][0] for k in ("choice_input_ids", "choice_attention_mask", "choice_labels"))
    with torch.no_grad():
        cached = module.choice_nll(ids, mask, labels)
        full = torch.stack([token_nll(module(ids[c : c + 1], mask[c : c + 1]), labels[c : c + 1])[0] for c in range(len(ids))])
    assert cached.shape == (len(LABELS),)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
