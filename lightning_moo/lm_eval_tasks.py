"""Task YAMLs for EleutherAI's lm-evaluation-harness that score local SIB-200 files the way
``lightning-moo test`` does, so that both report the same accuracy on the same rows.

    lightning-moo lm-eval-tasks --sib200 ../shared/data/sib200 --languages eng_Latn deu_Latn \\
        --tokenizer EXPORTED_DIR --out TASKDIR
    lm_eval --model hf --model_args pretrained=EXPORTED_DIR,add_bos_token=False \\
        --include_path TASKDIR --tasks sib200_local

One task per language, ``sib200_local_<code>``, and the group ``sib200_local`` (unweighted mean over
languages, as ``lightning-moo test`` averages languages). Each task reads a JSONL file written next to
its YAML rather than the TSV itself: the rows come from :class:`MultilingualDataModule` (the same TSV
parsing, the same evenly spaced ``--max-examples`` rows) and each holds the prompt and the choices
already rendered by the same :class:`Encoder` (``str.format``, the chat template), so nothing depends
on how lm-eval's csv loader or its Jinja templates would read them. Each choice ends with the EOS
token's text because ``lightning-moo test`` scores label + EOS. The one difference left: lm-eval moves
whitespace at the end of a prompt (a chat template's "assistant\n") into every choice and scores it
too, the same amount for every label, so choices and accuracy still agree. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from .data import MultilingualDataModule
from .data.encoding import _default_bos
from .data.rows import DataError
from .hf import load_tokenizer

GROUP = "sib200_local"
# configs/sib200_smollm2.yaml's data options (tests/test_lm_eval.py checks that they stay equal).
PROMPT_TEMPLATE = (
    "Classify the topic of this sentence as one of: science/technology, travel, politics, sports, health, "
    "entertainment, geography.\nSentence: {text}"
)
RESPONSE_TEMPLATE = "{category}"
LABEL_FIELD = "category"
LABELS = ["science/technology", "travel", "politics", "sports", "health", "entertainment", "geography"]


def write_tasks(
    sib200: str,
    languages: list[str],
    out: str,
    tokenizer: Any,
    split: str = "test",
    prompt_template: str = PROMPT_TEMPLATE,
    response_template: str = RESPONSE_TEMPLATE,
    label_field: str = LABEL_FIELD,
    labels: Optional[list[str]] = None,
    chat_template: bool = False,
    max_examples: Optional[int] = None,
) -> list[str]:
    """Writes ``<out>/sib200_local_<code>.{yaml,jsonl}`` per language and ``<out>/sib200_local.yaml``;
    returns the task names. ``tokenizer``: the evaluated model's (its EOS and chat template)."""
    if not languages:
        raise ValueError("no languages: pass --languages, e.g. --languages eng_Latn deu_Latn")
    eos = _eos_text(tokenizer)
    # The DataModule reads the rows and raises the DataErrors that name a missing language, an empty
    # split or an unknown column; its encoder renders prompt and choices exactly as for `test`.
    data = MultilingualDataModule(
        train_languages=languages, source=str(sib200), file_pattern="{language}/{split}.tsv",
        splits={"test": split}, prompt_template=prompt_template, response_template=response_template,
        chat_template=chat_template, label_field=label_field, labels=labels or LABELS,
        max_eval_examples=max_examples, tokenizer=tokenizer,
    )
    encoder = data.encoder
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    tasks = []
    for language in languages:
        rows = data.load_rows(language, "test")
        name = f"{GROUP}_{language}"
        with open(root / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                prompt, _, choices, index = encoder._texts(row, with_choices=True)
                doc = {"prompt": prompt, "choices": [c + eos for c in choices], "label": index, "row": row.where}
                handle.write(json.dumps(doc, ensure_ascii=False) + "\n")
        task = {
            "task": name,
            "dataset_path": "json",
            # Absolute: lm_eval resolves data_files against its working directory.
            "dataset_kwargs": {"data_files": {"test": str(root / f"{name}.jsonl")}},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": "prompt",
            "doc_to_choice": "choices",
            "doc_to_target": "label",
            # The Encoder tokenizes prompt and response and concatenates the ids: no separator.
            "target_delimiter": "",
            # acc: argmax of the summed log-likelihood, the argmin of choice_nlls (acc_norm divides by length).
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        }
        (root / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False, allow_unicode=True), encoding="utf-8")
        tasks.append(name)
    group = {
        "group": GROUP,
        "task": tasks,
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": False}],
        "metadata": {"version": 1.0},
    }
    (root / f"{GROUP}.yaml").write_text(yaml.safe_dump(group, sort_keys=False), encoding="utf-8")
    return tasks


def add_bos_token(tokenizer: Any, chat_template: bool = False) -> bool:
    """The value of lm-eval's HFLM ``add_bos_token`` that tokenizes as the Encoder does.

    lm-eval's True/False is the tokenizer's ``add_special_tokens``: every special token the tokenizer
    adds, before and after. The Encoder adds only the ones before (none under a chat template)."""
    if chat_template:
        return False
    bos = _default_bos(tokenizer)
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    after = tokenizer("a")["input_ids"][len(bos) + len(bare):]
    if bos and after:
        raise ValueError(
            f"the tokenizer adds {bos} before and {after} after every text; no lm-eval add_bos_token setting "
            "adds only the tokens before, as lightning-moo test does: compare with --log_samples"
        )
    return bool(bos)


def _eos_text(tokenizer: Any) -> str:
    """The EOS token as text that tokenizes back to the EOS id alone (lm-eval sees only text)."""
    if tokenizer.eos_token_id is None:
        return ""  # the Encoder appends no EOS either
    text = tokenizer.eos_token
    if tokenizer(text, add_special_tokens=False)["input_ids"] != [tokenizer.eos_token_id]:
        raise ValueError(
            f"the tokenizer does not read its EOS text {text!r} back as the EOS token (split_special_tokens?); "
            "lm-eval could not score label + EOS as lightning-moo test does"
        )
    return text


def options_from_config(path: str) -> dict[str, Any]:
    """The task options a fit config's ``data:`` section implies (the rows and rendering of
    ``lightning-moo test`` with that config): evaluated languages, split, templates, labels."""
    data = (yaml.safe_load(Path(path).read_text()) or {}).get("data") or {}
    pattern = data.get("file_pattern", "{language}/{split}.tsv")
    if pattern != "{language}/{split}.tsv":
        raise ValueError(f"{path}: data.file_pattern is {pattern!r}; the tasks read SIB-200's <code>/<split>.tsv layout")
    seen = data.get("seen_languages") or data.get("train_languages") or []
    options = {
        "sib200": data.get("source"),
        "languages": list(seen) + list(data.get("unseen_languages") or []),
        "split": (data.get("splits") or {}).get("test", "test"),
        "prompt_template": data.get("prompt_template"),
        "response_template": data.get("response_template"),
        "label_field": data.get("label_field"),
        "labels": data.get("labels"),
        "chat_template": data.get("chat_template"),
        "max_examples": data.get("max_eval_examples"),
    }
    return {key: value for key, value in options.items() if value not in (None, [])}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning-moo lm-eval-tasks",
        description="Write lm-evaluation-harness task YAMLs that score local SIB-200 files as lightning-moo test does.",
    )
    parser.add_argument("--config", help="a fit config: its data: section gives every option below not given here")
    parser.add_argument("--sib200", help="directory with <flores_code>/{train,dev,test}.tsv (data.source)")
    parser.add_argument("--languages", nargs="+", help="FLORES codes, e.g. eng_Latn deu_Latn")
    parser.add_argument("--split", help="file name without .tsv (default: test)")
    parser.add_argument("--out", required=True, help="directory for the task YAMLs (lm_eval --include_path)")
    parser.add_argument("--tokenizer", required=True,
                        help="the evaluated model's directory (its tokenizer's EOS and chat template), or 'bytes'")
    parser.add_argument("--prompt-template", help="data.prompt_template (str.format over the columns)")
    parser.add_argument("--response-template", help="data.response_template")
    parser.add_argument("--label-field", help="data.label_field")
    parser.add_argument("--labels", nargs="+", help="data.labels, in the config's order")
    parser.add_argument("--chat-template", action="store_true", default=None, help="data.chat_template: true")
    parser.add_argument("--max-examples", type=int, help="data.max_eval_examples (evenly spaced rows)")
    args = parser.parse_args(argv)
    # Given flags, then the config's data: section, then the SIB-200 config's defaults.
    defaults = {"split": "test", "prompt_template": PROMPT_TEMPLATE, "response_template": RESPONSE_TEMPLATE,
                "label_field": LABEL_FIELD, "labels": LABELS, "chat_template": False, "max_examples": None}
    try:
        from_config = options_from_config(args.config) if args.config else {}
    except (OSError, ValueError, yaml.YAMLError) as exc:
        sys.exit(f"error: --config: {exc}")
    options = {**defaults, **from_config, **{k: v for k, v in vars(args).items() if v is not None and k in
                                              {"sib200", "languages", *defaults}}}
    missing = [f"--{name}" for name in ("sib200", "languages") if not options.get(name)]
    if missing:
        parser.error(f"{' and '.join(missing)} (or a --config whose data: section gives them) required")
    tokenizer = load_tokenizer(args.tokenizer)
    try:
        tasks = write_tasks(options["sib200"], options["languages"], args.out, tokenizer, split=options["split"],
                            prompt_template=options["prompt_template"], response_template=options["response_template"],
                            label_field=options["label_field"], labels=options["labels"],
                            chat_template=options["chat_template"], max_examples=options["max_examples"])
        bos = add_bos_token(tokenizer, options["chat_template"])
    except (DataError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    print(f"wrote {len(tasks)} tasks and the group {GROUP} to {Path(args.out).resolve()}")
    model = args.tokenizer if Path(args.tokenizer).is_dir() else "MODEL_DIR"
    print("score them with:")
    print(f"  lm_eval --model hf --model_args pretrained={model},add_bos_token={bos} "
          f"--include_path {args.out} --tasks {GROUP}")


if __name__ == "__main__":
    main()
