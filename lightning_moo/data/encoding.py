"""Rows to token ids with exact loss masks: plain text, prompt/response templates, chat messages and
classification with one candidate sequence per label. :class:`Encoder` needs a tokenizer and the
options, no Trainer."""

from __future__ import annotations

import re
import string
from typing import Any, Optional

from .rows import DataError, Row

TRUNCATION = ("truncate", "drop", "error")


def check_options(truncation: str, prompt_template: Optional[str], response_template: Optional[str],
                  label_field: Optional[str]) -> None:
    """The option combinations that cannot work, refused before any data is read."""
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation={truncation!r} is not one of {', '.join(TRUNCATION)}")
    if prompt_template and not (response_template or label_field):
        raise ValueError("prompt_template needs response_template or label_field: the loss covers the response")


def required_columns(text_field: str = "text", prompt_template: Optional[str] = None,
                     response_template: Optional[str] = None, messages_field: Optional[str] = None,
                     label_field: Optional[str] = None) -> dict[str, str]:
    """column -> the option that needs it: what every row must have for these options."""
    needed = {}
    if messages_field:
        needed[messages_field] = "messages_field"
    elif response_template or label_field:
        needed.update({c: "prompt_template" for c in _template_columns(prompt_template)})
        needed.update({c: "response_template" for c in _template_columns(response_template)})
        if label_field:
            needed[label_field] = "label_field"
    else:
        needed[text_field] = "text_field"
    return needed


def _template_columns(template: Optional[str]) -> list[str]:
    if not template:
        return []
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    # "{meta[lang]}" or "{meta.lang}" reads the column "meta"
    return [re.match(r"[^.\[]*", name).group() for name in names]


class Encoder:
    """Tokenizes rows into examples: ``input_ids``, ``labels`` (-100 off the loss) and ``num_bytes``
    (UTF-8 bytes of the loss-bearing text), plus ``choices`` and ``label_index`` for classification.

    See :class:`~lightning_moo.data.MultilingualDataModule` for the options; ``tokenizer`` is a
    transformers tokenizer (one with a chat template for ``messages_field`` / ``chat_template``).
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int = 256,
        truncation: str = "truncate",
        text_field: str = "text",
        prompt_template: Optional[str] = None,
        response_template: Optional[str] = None,
        messages_field: Optional[str] = None,
        chat_template: bool = False,
        label_field: Optional[str] = None,
        labels: Optional[list[str]] = None,
    ):
        check_options(truncation, prompt_template, response_template, label_field)
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
        if (messages_field or chat_template) and not getattr(tokenizer, "chat_template", None):
            raise ValueError("messages_field/chat_template need a tokenizer with a chat_template")
        self.tokenizer, self.max_length, self.truncation = tokenizer, max_length, truncation
        self.text_field, self.prompt_template, self.response_template = text_field, prompt_template, response_template
        self.messages_field, self.chat_template = messages_field, chat_template
        self.label_field, self.labels = label_field, None if labels is None else [str(x) for x in labels]
        self.required = required_columns(text_field, prompt_template, response_template, messages_field, label_field)
        # A chat template renders its own BOS as text; otherwise add what the tokenizer adds by default.
        self.bos = [] if (messages_field or chat_template) else _default_bos(tokenizer)
        self.eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        self.pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id

    def encode(self, rows: list[Row], with_choices: bool = False) -> tuple[list[dict], dict[str, int]]:
        """Token ids, labels and byte counts of rows; returns (examples, counts of empty, truncated and
        dropped rows). Prompt and response are tokenized separately so the loss mask is exact."""
        with_choices = with_choices and self.labels is not None and self.label_field is not None
        texts = [(row, t) for row in rows if (t := self._texts(row, with_choices)) is not None]
        counts = {"rows": len(rows), "empty": len(rows) - len(texts), "truncated": 0, "dropped": 0}
        prompts = self._ids([t[0] for _, t in texts])
        responses = self._ids([t[1] for _, t in texts])
        choices = iter(self._ids([c for _, t in texts for c in t[2]]))
        examples = []
        for (row, (_, response_text, choice_texts, index)), prompt, response in zip(texts, prompts, responses):
            targets = [response + self.eos] + [next(choices) + self.eos for _ in choice_texts]
            length = len(self.bos) + len(prompt) + max(map(len, targets))
            if length > self.max_length:
                if self.truncation == "error":
                    raise DataError(
                        f"{row.where}: {length} tokens, longer than max_length={self.max_length}; raise "
                        "max_length, or set truncation='truncate' (cut the prompt from the left, plain text "
                        "at the end) or truncation='drop' (skip such rows)"
                    )
                if self.truncation == "drop":
                    counts["dropped"] += 1
                    continue
                counts["truncated"] += 1
                prompt = prompt[min(length - self.max_length, len(prompt)) :]
            head = self.bos + prompt
            sequences = [
                ((head + t)[: self.max_length], ([-100] * len(head) + t)[: self.max_length]) for t in targets
            ]
            kept = len(sequences[0][0]) - len(head)
            # Loss per byte: the bytes of the response text, or of the part that survived truncation.
            if kept < len(response):
                response_text = self.tokenizer.decode(response[:kept], skip_special_tokens=True)
            example = {
                "input_ids": sequences[0][0],
                "labels": sequences[0][1],
                "num_bytes": len(response_text.encode("utf-8")),
            }
            if with_choices:
                example["choices"], example["label_index"] = sequences[1:], index
            examples.append(example)
        return examples, counts

    def _texts(self, row: Row, with_choices: bool) -> Optional[tuple[str, str, list[str], Any]]:
        """(prompt, response, choice responses, label index) of a row; None for an empty plain text."""
        for column in self.required:
            if row.data.get(column) is None:
                raise DataError(f"{row.where}: no value in column {column!r}; fill it or remove the row")
        if self.messages_field:
            messages = row.data[self.messages_field]
            last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
            if last is None:
                raise DataError(f"{row.where}: no message with role 'assistant' in {self.messages_field!r}")
            return self._render_chat(messages[:last]), messages[last]["content"], [], None
        if not (self.response_template or self.label_field):
            text = str(row.data[self.text_field])
            return None if not text.strip() else ("", text, [], None)
        prompt = self.prompt_template.format(**row.data) if self.prompt_template else ""
        if self.chat_template:
            prompt = self._render_chat([{"role": "user", "content": prompt}])
        label = str(row.data[self.label_field]) if self.label_field else None
        index = None
        if self.labels is not None and self.label_field:
            if label not in self.labels:
                raise DataError(
                    f"{row.where}: label {label!r} in column {self.label_field!r} is not one of labels "
                    f"({', '.join(self.labels)}); add it to labels or fix the row"
                )
            index = self.labels.index(label)
        choices = [self._response(row.data, c) for c in self.labels] if with_choices else []
        return prompt, self._response(row.data, label), choices, index

    def _render_chat(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _response(self, data: dict, label: Optional[str]) -> str:
        if self.response_template is None:
            return label
        if self.label_field:
            data = {**data, self.label_field: label}
        return self.response_template.format(**data)

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _default_bos(tokenizer: Any) -> list[int]:
    """What the tokenizer puts before a text by default (a BOS, or nothing)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    starts = [k for k in range(len(full) - len(bare) + 1) if full[k : k + len(bare)] == bare]
    return full[: starts[0]] if starts else []
