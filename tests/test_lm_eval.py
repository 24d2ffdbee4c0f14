"""lm-evaluation-harness on an exported model scores SIB-200 exactly as ``lightning-moo test`` does: the
task YAMLs of ``lightning_moo.lm_eval_tasks`` give the same log-likelihood per label, hence the same
choice per example and the same accuracy per language, as MultilingualLM on the DataModule's batches."""

from __future__ import annotations

import copy
import os
import re
import warnings
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets / lm_eval read them
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import yaml
from lightning.pytorch import Trainer

from lightning_moo import lm_eval_tasks
from lightning_moo.data import MultilingualDataModule
from lightning_moo.module import MultilingualLM

ROOT = Path(__file__).resolve().parents[1]
SHARED_SIB200 = ROOT / ".." / "shared" / "data" / "sib200"
LANGUAGES = ["eng_Latn", "rus_Cyrl"]
HEADER = "index_id\tcategory\ttext\n"
# Without ../shared (a fresh clone): SIB-200-shaped rows, quotes included (read as they stand, QUOTE_NONE).
FALLBACK = {
    "eng_Latn": ["The train leaves at eight.", 'He said "the match ended in a draw".', "The election is in May.",
                 "Drink a lot of water, the doctor says.", "The museum opens a new wing.", "Mountains cover the north."],
    "rus_Cyrl": ["Поезд отправляется в восемь.", 'Он сказал: "матч закончился вничью".', "Выборы пройдут в мае.",
                 "Врач советует пить много воды.", "Музей открывает новое крыло.", "Горы покрывают север."],
}
CATEGORIES = ["travel", "sports", "politics", "health", "entertainment", "geography"]
# A random Llama whose large initial weights make its choices depend on the prompt (at the usual 0.02
# every prompt picks the shortest label, and a wrong prompt would go unnoticed).
TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
        "initializer_range": 0.5}
MAX_EXAMPLES = 16
# SmolLM2-Instruct's format; the generation prompt ends in "\n", which lm-eval moves from the prompt
# to the front of every choice (harmless: one token either way for the byte tokenizer).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def sib200(tmp_path_factory) -> Path:
    if SHARED_SIB200.is_dir():
        return SHARED_SIB200.resolve()
    warnings.warn(f"{SHARED_SIB200} not found: testing on {len(FALLBACK['eng_Latn'])} made-up rows per language")
    root = tmp_path_factory.mktemp("sib200")
    for language, sentences in FALLBACK.items():
        write(root, language, HEADER + "".join(f"{i}\t{c}\t{s}\n" for i, (c, s) in enumerate(zip(CATEGORIES, sentences))))
    return root


def write(root: Path, language: str, body: str, split: str = "test") -> Path:
    path = root / language / f"{split}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[MultilingualLM, Path]:
    """A tiny random model, trained 0 steps, saved as ``lightning-moo export`` saves one."""
    torch.manual_seed(0)
    module = MultilingualLM(model_config=TINY, tokenizer="bytes").eval()
    module.tokenizer.chat_template = CHAT_TEMPLATE
    directory = tmp_path_factory.mktemp("exported")
    module.model.save_pretrained(directory)
    module.tokenizer.save_pretrained(directory)
    return module, directory


def test_defaults_are_the_sib200_config():
    data = yaml.safe_load((ROOT / "configs" / "sib200_smollm2.yaml").read_text())["data"]
    assert lm_eval_tasks.PROMPT_TEMPLATE == data["prompt_template"]
    assert lm_eval_tasks.RESPONSE_TEMPLATE == data["response_template"]
    assert lm_eval_tasks.LABEL_FIELD == data["label_field"]
    assert lm_eval_tasks.LABELS == data["labels"]


def lightning_moo_test(module: MultilingualLM, sib200: Path, chat: bool = False) -> tuple[dict, dict]:
    """What ``lightning-moo test`` computes: the logged accuracy per language from the module's test
    loop, and each example's summed NLL per label (``choice_nlls``, whose argmin that accuracy counts)."""
    data = MultilingualDataModule(
        train_languages=LANGUAGES, source=str(sib200), file_pattern="{language}/{split}.tsv",
        prompt_template=lm_eval_tasks.PROMPT_TEMPLATE, response_template=lm_eval_tasks.RESPONSE_TEMPLATE,
        chat_template=chat, label_field=lm_eval_tasks.LABEL_FIELD, labels=lm_eval_tasks.LABELS, max_length=1024,
        truncation="error", eval_batch_size=4, max_eval_examples=MAX_EXAMPLES,
    )
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False)
    metrics = trainer.test(module, datamodule=data, verbose=False)[0]
    nlls = {}
    with torch.no_grad():
        for loader in data.test_dataloader():
            for batch in loader:
                nlls.setdefault(batch["language"], []).extend(module.choice_nlls(batch).tolist())
    return metrics, nlls


def run_lm_eval(model_args: str, tasks: Path) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model="hf", model_args=f"{model_args},dtype=float32,device=cpu,add_bos_token=False", tasks=[lm_eval_tasks.GROUP],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False), batch_size=8, log_samples=True,
    )


def assert_agree(results: dict, metrics: dict, nlls: dict, sib200: Path, chat: bool = False) -> None:
    for language in LANGUAGES:
        task = f"sib200_local_{language}"
        samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        loglikelihoods = [[ll for ll, _ in s["filtered_resps"]] for s in samples]
        assert len(loglikelihoods) == len(nlls[language]) > 0
        # Per label of every example: lm-eval's log-likelihood is minus our summed NLL (a prompt,
        # delimiter, BOS or EOS mismatch moves it by whole tokens, several nats). Under the chat template
        # lm-eval also scores the prompt's final "\n": one offset, the same for every label.
        for theirs, mine in zip(loglikelihoods, nlls[language]):
            offset = theirs[0] + mine[0]
            assert offset < -1e-2 if chat else offset == pytest.approx(0, abs=1e-3)
            assert theirs == pytest.approx([offset - x for x in mine], abs=1e-3)
        chosen = [max(range(len(ll)), key=ll.__getitem__) for ll in loglikelihoods]
        assert chosen == [min(range(len(n)), key=n.__getitem__) for n in nlls[language]]
        if not chat and sib200 == SHARED_SIB200.resolve():
            # On real rows the tiny model's choice varies with the prompt (not after the chat template's
            # "assistant\n", nor on the six short made-up rows), so comparing choices means something.
            assert len(set(chosen)) > 1, "the model picks one label for every prompt: choices would not show a wrong prompt"
        assert results["results"][task]["acc,none"] == pytest.approx(metrics[f"test/acc_{language}"], abs=1e-6)
    mean = sum(metrics[f"test/acc_{language}"] for language in LANGUAGES) / len(LANGUAGES)
    assert results["results"][lm_eval_tasks.GROUP]["acc,none"] == pytest.approx(mean, abs=1e-6)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat_template"])
def test_lm_eval_scores_as_lightning_moo_test(sib200, exported, tmp_path, capsys, chat):
    module, directory = exported
    tasks = tmp_path / "tasks"
    lm_eval_tasks.main(["--sib200", str(sib200), "--languages", *LANGUAGES, "--out", str(tasks),
                        "--tokenizer", str(directory), "--max-examples", str(MAX_EXAMPLES)] + ["--chat-template"] * chat)
    # ByT5 appends EOS to every text it encodes (and a chat template renders its own specials): lm-eval
    # must add no special tokens at all.
    printed = capsys.readouterr().out
    assert f"pretrained={directory},add_bos_token=False --include_path {tasks} --tasks sib200_local" in printed
    assert_agree(run_lm_eval(f"pretrained={directory}", tasks), *lightning_moo_test(module, sib200, chat), sib200, chat)


@pytest.mark.timeout(300)
def test_lm_eval_scores_a_lora_adapter_on_its_base(sib200, tmp_path):
    """docs/evaluation.md's ``pretrained=BASE,peft=ADAPTER,tokenizer=ADAPTER``: the adapter's scores,
    not the base's (the adapter is made non-zero, so that a base scored alone would fail)."""
    torch.manual_seed(0)
    module = MultilingualLM(model_config=TINY, tokenizer="bytes", peft={"r": 4, "lora_alpha": 8}).eval()
    for name, parameter in module.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    copy.deepcopy(module.model).unload().save_pretrained(base)  # as export writes <out>/base: no tokenizer
    module.model.save_pretrained(adapter)
    module.tokenizer.save_pretrained(adapter)
    tasks = tmp_path / "tasks"
    lm_eval_tasks.write_tasks(str(sib200), LANGUAGES, str(tasks), module.tokenizer, max_examples=MAX_EXAMPLES)
    results = run_lm_eval(f"pretrained={base},peft={adapter},tokenizer={adapter}", tasks)
    assert_agree(results, *lightning_moo_test(module, sib200), sib200)


def test_tasks_hold_the_rendered_prompt_and_label_plus_eos(tmp_path):
    write(tmp_path / "sib", "eng_Latn", HEADER + "1\tsports\tA goal.\n2\ttravel\tA train.\n3\thealth\tAn apple.\n")
    from lightning_moo.hf import load_tokenizer

    names = lm_eval_tasks.write_tasks(str(tmp_path / "sib"), ["eng_Latn"], str(tmp_path / "out"),
                                      load_tokenizer("bytes"), prompt_template="Text: {text}\nTopic:",
                                      response_template=" {category}", max_examples=2)
    assert names == ["sib200_local_eng_Latn"]
    task = yaml.safe_load((tmp_path / "out" / "sib200_local_eng_Latn.yaml").read_text())
    assert task["target_delimiter"] == "" and task["output_type"] == "multiple_choice"
    docs = [yaml.safe_load(line) for line in Path(task["dataset_kwargs"]["data_files"]["test"]).read_text().splitlines()]
    # Evenly spaced rows 0 and 1 (⌊i·3/2⌋), as max_eval_examples takes them.
    assert [d["prompt"] for d in docs] == ["Text: A goal.\nTopic:", "Text: A train.\nTopic:"]
    assert docs[0]["choices"] == [f" {label}</s>" for label in lm_eval_tasks.LABELS]
    assert [d["label"] for d in docs] == [lm_eval_tasks.LABELS.index("sports"), lm_eval_tasks.LABELS.index("travel")]
    group = yaml.safe_load((tmp_path / "out" / "sib200_local.yaml").read_text())
    assert group["group"] == "sib200_local" and group["task"] == names


@pytest.mark.parametrize("case, message", [
    ("missing language", "unknown language 'deu_Latn'.*languages with such files: eng_Latn"),
    ("empty split", "eng_Latn/test.tsv: has a header \\(index_id, category, text\\) but no rows; add rows"),
    ("unknown column", "missing column 'sentence' \\(needed by prompt_template\\); available columns: index_id, category, text"),
    ("unknown label", "label 'weather' in column 'category' is not one of labels"),
])
def test_writer_errors_name_the_fix(tmp_path, capsys, case, message):
    rows = "weather" if case == "unknown label" else "sports"
    write(tmp_path, "eng_Latn", HEADER + ("" if case == "empty split" else f"1\t{rows}\tA goal.\n"))
    argv = ["--sib200", str(tmp_path), "--languages", "eng_Latn", "--out", str(tmp_path / "out"), "--tokenizer", "bytes"]
    if case == "missing language":
        argv[3:4] = ["eng_Latn", "deu_Latn"]
    if case == "unknown column":
        argv += ["--prompt-template", "Sentence: {sentence}"]
    with pytest.raises(SystemExit) as exit:
        lm_eval_tasks.main(argv)
    assert str(exit.value).startswith("error: ")
    assert re.search(message, str(exit.value)), str(exit.value)


def test_a_fit_configs_data_section_gives_the_same_tasks_as_its_flags(tmp_path, capsys):
    """``--config`` reads the languages, split, templates, labels and row count from the config's
    ``data:`` section; the tasks are the ones the same values as flags write, and flags still win."""
    for language in ("eng_Latn", "rus_Cyrl", "tha_Thai"):
        write(tmp_path / "sib", language, HEADER + "".join(f"{i}\t{c}\tSentence {i}.\n" for i, c in enumerate(CATEGORIES)))
    config = tmp_path / "fit.yaml"
    config.write_text(yaml.safe_dump({"data": {
        "source": str(tmp_path / "sib"), "file_pattern": "{language}/{split}.tsv", "splits": {"test": "test"},
        "train_languages": ["eng_Latn", "rus_Cyrl"], "unseen_languages": ["tha_Thai"],
        "prompt_template": "Topic of: {text}\n", "response_template": "{category}", "label_field": "category",
        "labels": lm_eval_tasks.LABELS, "max_eval_examples": 4}}))
    lm_eval_tasks.main(["--config", str(config), "--tokenizer", "bytes", "--out", str(tmp_path / "from_config")])
    lm_eval_tasks.main(["--sib200", str(tmp_path / "sib"), "--languages", "eng_Latn", "rus_Cyrl", "tha_Thai",
                        "--prompt-template", "Topic of: {text}\n", "--max-examples", "4", "--tokenizer", "bytes",
                        "--out", str(tmp_path / "from_flags")])
    written = sorted(p.name for p in (tmp_path / "from_flags").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "from_config").iterdir()) and len(written) == 7
    for name in written:
        if name.endswith(".jsonl"):
            assert (tmp_path / "from_config" / name).read_text() == (tmp_path / "from_flags" / name).read_text()
    lm_eval_tasks.main(["--config", str(config), "--languages", "eng_Latn", "--tokenizer", "bytes", "--out", str(tmp_path / "one")])
    assert sorted(p.name for p in (tmp_path / "one").glob("*.jsonl")) == ["sib200_local_eng_Latn.jsonl"]
    # The shipped SIB-200 config parses into the options the docs list.
    options = lm_eval_tasks.options_from_config(str(ROOT / "configs" / "sib200_smollm2.yaml"))
    assert options["languages"][-3:] == ["tha_Thai", "ben_Beng", "tel_Telu"] and options["chat_template"] is True
    assert options["prompt_template"] == lm_eval_tasks.PROMPT_TEMPLATE and options["split"] == "test"
