"""MultilingualDataModule: layouts, loss masks, truncation, sharding, bad-data errors, the builtin
corpus and exact mid-epoch resume. Data files are written to tmp_path; nothing is downloaded."""

import json
import re
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from datasets import Dataset
from transformers import ByT5Tokenizer

from lightning_moo.data import STAGES, DataError, Encoder, EpochShuffleSampler, MultilingualDataModule, Row, pad
from lightning_moo.data import FORMATS, FilePerLanguage, LanguageColumnFiles, open_source
from lightning_moo.layout import LanguageLayout
from tiny_lm import make_tokenizer, word

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def byt5():
    return ByT5Tokenizer()


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_tsv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n", encoding="utf-8")
    return path


def fake_trainer(rank=0, world=1, distributed_sampler=False):
    return SimpleNamespace(
        global_rank=rank,
        world_size=world,
        lightning_module=None,
        _accelerator_connector=SimpleNamespace(use_distributed_sampler=distributed_sampler),
    )


def loss_ids(batch, i):
    """The token ids that carry loss in row i."""
    keep = batch["labels"][i] != -100
    return batch["input_ids"][i][keep].tolist()


def only_batch(loader):
    batches = list(loader)
    assert len(batches) == 1
    return batches[0]


# ----- layouts -----


def test_jsonl_file_per_language_plain_text(tmp_path, byt5):
    texts = {"deu": ["Grüße aus Köln", "zwei"], "fra": ["à bientôt", "deux mots ici"]}
    for lang, rows in texts.items():
        for split in ("train", "validation"):
            write_jsonl(tmp_path / lang / f"{split}.jsonl", [{"text": t} for t in rows])
    dm = MultilingualDataModule(
        ["deu"], unseen_languages=["fra"], source=str(tmp_path), file_pattern="{language}/{split}.jsonl",
        tokenizer=byt5, batch_size=2,
    )
    dm.setup("fit")
    train = only_batch(dm.train_dataloader())
    assert train["language"] == "deu"
    for i in range(2):
        n = int(train["attention_mask"][i].sum())
        text = byt5.decode(train["input_ids"][i][: n - 1])
        assert text in texts["deu"]
        assert train["input_ids"][i][n - 1] == byt5.eos_token_id
        assert (train["input_ids"][i][n:] == byt5.pad_token_id).all()
        assert train["labels"][i][:n].tolist() == train["input_ids"][i][:n].tolist()  # all text tokens + EOS
        assert (train["labels"][i][n:] == -100).all()
        assert train["num_bytes"][i] == len(text.encode("utf-8"))
    loaders = dm.val_dataloader()
    assert [only_batch(dl)["language"] for dl in loaders] == ["deu", "fra"]
    assert dm.eval_languages == ["deu", "fra"]
    assert dm.language_kind("deu") == "seen" and dm.language_kind("fra") == "unseen"


def test_tsv_language_column_split_files(tmp_path):
    tok = make_tokenizer()
    for split in ("train", "dev"):
        rows = [("aaa_Latn", word(0, 0)), ("bbb_Latn", word(1, 0)), ("aaa_Latn", f"{word(0, 1)} {word(0, 2)}")]
        write_tsv(tmp_path / f"{split}.tsv", ("lang", "sentence"), rows)
    dm = MultilingualDataModule(
        ["bbb_Latn"], seen_languages=["bbb_Latn", "aaa_Latn"], source=str(tmp_path), file_pattern="{split}.tsv",
        language_column="lang", text_field="sentence", splits={"validation": "dev"}, tokenizer=tok, batch_size=1,
    )
    dm.setup("fit")
    assert [r.where for r in dm.load_rows("aaa_Latn", "validation")] == [f"{tmp_path / 'dev.tsv'}:{n}" for n in (2, 4)]
    train = only_batch(dm.train_dataloader())
    assert train["language"] == "bbb_Latn"
    # The word-level tokenizer has no EOS: the loss covers the text tokens only.
    assert train["input_ids"].tolist() == [[tok.convert_tokens_to_ids(word(1, 0))]]
    assert loss_ids(train, 0) == train["input_ids"][0].tolist()
    aaa = list(dm.val_dataloader()[1])
    assert sorted(int(b["attention_mask"].sum()) for b in aaa) == [1, 2]


def test_single_file_language_column_holdout(tmp_path, byt5):
    rows = [{"lang": lang, "text": f"{lang} {i}"} for i in range(25) for lang in ("x", "y")]
    path = write_jsonl(tmp_path / "all.jsonl", rows)
    dm = MultilingualDataModule(["x"], source=str(path), language_column="lang", tokenizer=byt5)
    split = {stage: [r.data["text"] for r in dm.load_rows("x", stage)] for stage in ("train", "validation", "test")}
    assert split["validation"] == ["x 8", "x 18"] and split["test"] == ["x 9", "x 19"]
    assert sorted(sum(split.values(), []), key=lambda t: int(t.split()[1])) == [f"x {i}" for i in range(25)]
    # jsonl line numbers count every line of the file, the other language's too
    assert dm.load_rows("x", "validation")[0].where == f"{path}:17"


# ----- templates -----


@pytest.mark.parametrize("tokenizer", ["byt5", "word"])
def test_prompt_response_mask_covers_exactly_the_response(tmp_path, byt5, tokenizer):
    tok = byt5 if tokenizer == "byt5" else make_tokenizer()
    rows = [{"text": f"{word(0, i)} {word(0, i + 1)}", "category": word(0, 9 - i)} for i in range(3)]
    write_jsonl(tmp_path / "aaa.jsonl", rows)
    dm = MultilingualDataModule(
        ["aaa"], source=str(tmp_path), file_pattern="{language}.jsonl", prompt_template="{text} {text}",
        response_template=" {category}", tokenizer=tok, batch_size=3, max_eval_examples=1,
    )
    examples, counts = dm.encode(dm.load_rows("aaa", "train"))
    assert counts == {"rows": len(examples), "empty": 0, "truncated": 0, "dropped": 0}
    eos = [] if tok.eos_token_id is None else [tok.eos_token_id]
    for row, example in zip(rows, examples):
        prompt = tok(f"{row['text']} {row['text']}", add_special_tokens=False)["input_ids"]
        response = tok(f" {row['category']}", add_special_tokens=False)["input_ids"]
        assert example["input_ids"] == prompt + response + eos
        assert example["labels"] == [-100] * len(prompt) + response + eos
        assert example["num_bytes"] == len(f" {row['category']}".encode())


def test_chat_messages_and_chat_template_flag(tmp_path):
    tok = ByT5Tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hallo?"},
        {"role": "assistant", "content": "Hallo!"},
    ]
    write_jsonl(tmp_path / "deu.jsonl", [{"messages": messages, "q": "Wie?", "a": "So."}])
    chat = MultilingualDataModule(
        ["deu"], source=str(tmp_path), file_pattern="{language}.jsonl", messages_field="messages", tokenizer=tok
    )
    (example,), _ = chat.encode(chat.load_rows("deu", "train"))
    prompt = "<system>Be brief.\n<user>Hallo?\n<assistant>"
    assert tok.decode(example["input_ids"]) == prompt + "Hallo!</s>"
    assert tok.decode([i for i, l in zip(example["input_ids"], example["labels"]) if l != -100]) == "Hallo!</s>"
    assert example["num_bytes"] == len("Hallo!")

    wrapped = MultilingualDataModule(
        ["deu"], source=str(tmp_path), file_pattern="{language}.jsonl", prompt_template="{q}",
        response_template=" {a}", chat_template=True, tokenizer=tok,
    )
    (example,), _ = wrapped.encode(wrapped.load_rows("deu", "train"))
    assert tok.decode(example["input_ids"]) == "<user>Wie?\n<assistant> So.</s>"
    assert tok.decode([i for i, l in zip(example["input_ids"], example["labels"]) if l != -100]) == " So.</s>"


def test_classification_choices(tmp_path, byt5):
    labels = ["sport", "politics", "science"]
    rows = [{"text": f"sentence {i}", "topic": labels[i % 3]} for i in range(4)]
    write_tsv(tmp_path / "en" / "validation.tsv", ("text", "topic"), [(r["text"], r["topic"]) for r in rows])
    dm = MultilingualDataModule(
        ["en"], source=str(tmp_path), file_pattern="{language}/{split}.tsv", prompt_template="Sentence: {text}\nTopic:",
        response_template=" {topic}", label_field="topic", labels=labels, tokenizer=byt5, eval_batch_size=4,
    )
    dm.setup("validate")
    batch = only_batch(dm.val_dataloader()[0])
    assert batch["choice_input_ids"].shape[:2] == (4, 3)
    assert batch["label_index"].tolist() == [0, 1, 2, 0]
    for i, row in enumerate(rows):
        for c, label in enumerate(labels):
            ids, mask = batch["choice_input_ids"][i, c], batch["choice_attention_mask"][i, c]
            keep = batch["choice_labels"][i, c] != -100
            assert byt5.decode(ids[keep]) == f" {label}</s>"  # the choice's response, EOS included
            assert byt5.decode(ids[mask.bool()]) == f"Sentence: {row['text']}\nTopic: {label}</s>"
        # the correct choice is the training sequence itself
        n = int(batch["attention_mask"][i].sum())
        correct = batch["label_index"][i]
        assert batch["input_ids"][i, :n].tolist() == batch["choice_input_ids"][i, correct, :n].tolist()
        assert batch["labels"][i, :n].tolist() == batch["choice_labels"][i, correct, :n].tolist()


def test_encoder_works_without_a_datamodule(byt5):
    encoder = Encoder(byt5, max_length=16, prompt_template="Q: {q}", response_template=" {a}")
    assert encoder.required == {"q": "prompt_template", "a": "response_template"}
    (example,), counts = encoder.encode([Row({"q": "2+2?", "a": "4"}, "mem", "mem row 0")])
    assert byt5.decode(example["input_ids"]) == "Q: 2+2? 4</s>"
    assert byt5.decode([i for i, l in zip(example["input_ids"], example["labels"]) if l != -100]) == " 4</s>"
    assert counts == {"rows": 1, "empty": 0, "truncated": 0, "dropped": 0} and encoder.pad_id == byt5.pad_token_id
    with pytest.raises(ValueError, match="need a tokenizer with a chat_template"):
        Encoder(byt5, chat_template=True)


def test_sources_and_pad_are_usable_alone(tmp_path):
    write_jsonl(tmp_path / "deu.jsonl", [{"text": f"deu {i}"} for i in range(10)])
    source = open_source(str(tmp_path), file_pattern="{language}.jsonl", required={"text": "text_field"})
    assert isinstance(source, FilePerLanguage)
    assert [r.data["text"] for r in source.rows("deu", "validation")] == ["deu 8"]
    write_jsonl(tmp_path / "all.jsonl", [{"lang": lang, "text": "a"} for lang in ("deu", "fra")])
    one_file = open_source(str(tmp_path / "all.jsonl"), language_column="lang")
    assert isinstance(one_file, LanguageColumnFiles) and len(one_file.rows("fra", "train")) == 1
    assert pad([[1, 2], [3]], 0).tolist() == [[1, 2], [3, 0]]
    assert pad([[1]], -100, width=3).tolist() == [[1, -100, -100]]


# ----- truncation and num_bytes -----


def test_truncation_policies_and_reporting(tmp_path, byt5):
    rows = [{"p": "x" * 20, "r": "ü" * 3}, {"p": "short", "r": "ok"}]
    write_jsonl(tmp_path / "deu.jsonl", rows)
    common = dict(source=str(tmp_path), file_pattern="{language}.jsonl", prompt_template="{p}",
                  response_template="{r}", tokenizer=byt5, max_length=12)
    keep = MultilingualDataModule(["deu"], **common)
    (long, short), counts = keep.encode(keep.load_rows("deu", "train"))
    assert counts == {"rows": 2, "empty": 0, "truncated": 1, "dropped": 0}
    # the response (6 bytes of ü plus EOS) is kept, the prompt cut from the left
    assert len(long["input_ids"]) == 12
    assert byt5.decode(long["input_ids"]) == "x" * 5 + "üüü</s>"
    assert byt5.decode([i for i, l in zip(long["input_ids"], long["labels"]) if l != -100]) == "üüü</s>"
    assert long["num_bytes"] == 6 and short["num_bytes"] == 2

    drop = MultilingualDataModule(["deu"], **{**common, "truncation": "drop"})
    examples, counts = drop.encode(drop.load_rows("deu", "train"))
    assert len(examples) == 1 and counts["dropped"] == 1
    with pytest.warns(UserWarning, match="1 truncated and 0 dropped"):
        keep._prepare("deu", "train")
    assert keep.report[("deu", "train")]["truncated"] == 1


def test_plain_text_truncation_cuts_the_end_and_counts_kept_bytes(tmp_path, byt5):
    write_jsonl(tmp_path / "deu.jsonl", [{"text": "Grüße aus Köln"}])
    dm = MultilingualDataModule(["deu"], source=str(tmp_path), file_pattern="{language}.jsonl", tokenizer=byt5,
                                max_length=5)
    (example,), counts = dm.encode(dm.load_rows("deu", "train"))
    # 5 byte tokens: G r ü(2) and the first byte of ß, which decodes to nothing and is not counted
    assert byt5.decode(example["input_ids"]) == "Grü"
    assert example["labels"] == example["input_ids"] and counts["truncated"] == 1
    assert example["num_bytes"] == len("Grü".encode())


def test_word_tokenizer_num_bytes_counts_the_text(tmp_path):
    tok = make_tokenizer()
    text = f"{word(2, 3)} {word(2, 4)}"
    write_jsonl(tmp_path / "ccc.jsonl", [{"text": text}])
    dm = MultilingualDataModule(["ccc"], source=str(tmp_path), file_pattern="{language}.jsonl", tokenizer=tok)
    (example,), _ = dm.encode(dm.load_rows("ccc", "train"))
    assert example["num_bytes"] == len(text) and len(example["input_ids"]) == 2


# ----- ranks -----


def test_eval_sharding_covers_every_row_once(tmp_path, byt5):
    for lang, n in (("deu", 7), ("fra", 5)):
        write_jsonl(tmp_path / lang / "validation.jsonl", [{"text": f"{lang} {i}"} for i in range(n)])
    seen = {"deu": [], "fra": []}
    for rank in range(3):
        dm = MultilingualDataModule(["deu", "fra", "deu"], seen_languages=["deu", "fra"], source=str(tmp_path),
                                    file_pattern="{language}/{split}.jsonl", tokenizer=byt5, eval_batch_size=2)
        dm.trainer = fake_trainer(rank, 3)
        dm.setup("validate")
        for loader in dm.val_dataloader():
            for batch in loader:
                for i in range(len(batch["input_ids"])):
                    seen[batch["language"]].append(byt5.decode(loss_ids(batch, i), skip_special_tokens=True))
    assert sorted(seen["deu"]) == [f"deu {i}" for i in range(7)]
    assert sorted(seen["fra"]) == [f"fra {i}" for i in range(5)]


def test_train_language_per_rank(tmp_path, byt5):
    for lang in ("deu", "fra"):
        write_jsonl(tmp_path / f"{lang}.jsonl", [{"text": f"{lang} {i}"} for i in range(10)])
    dm = MultilingualDataModule(["deu", "fra"], source=str(tmp_path), file_pattern="{language}.jsonl",
                                tokenizer=byt5, batch_size=2)
    dm.trainer = fake_trainer(1, 2)
    assert dm.train_language == "fra"
    dm._train_batches = 1  # what the min over ranks would give; no process group here
    dm._prepare("fra", "train")
    batch = only_batch(dm.train_dataloader())
    assert batch["language"] == "fra"
    assert all(byt5.decode(loss_ids(batch, i), skip_special_tokens=True).startswith("fra") for i in range(2))
    dm.trainer = fake_trainer(0, 3)
    with pytest.raises(ValueError, match=r"world size 3 is not a multiple of the 2 train_languages"):
        dm.train_language
    dm.trainer = fake_trainer(0, 2, distributed_sampler=True)
    with pytest.raises(ValueError, match="use_distributed_sampler: false"):
        dm.setup("validate")


def test_language_groups_split_each_language_between_its_ranks(tmp_path, byt5):
    """World 4 = 2 languages × 2 ranks: ranks 0, 1 read deu, ranks 2, 3 fra; a language's ranks see
    disjoint rows, and together all the rows an epoch holds."""
    for lang in ("deu", "fra"):
        write_jsonl(tmp_path / f"{lang}.jsonl", [{"text": f"{lang} {i}"} for i in range(20)])
    seen = {}
    for rank in range(4):
        dm = MultilingualDataModule(["deu", "fra"], source=str(tmp_path), file_pattern="{language}.jsonl",
                                    tokenizer=byt5, batch_size=2, splits={"train": "train"})
        dm.trainer = fake_trainer(rank, 4)
        dm._prepare(dm.train_language, "train")
        dm._train_batches = len(dm.examples[(dm.train_language, "train")]) // 2 // 2
        texts = [byt5.decode(loss_ids(b, i), skip_special_tokens=True)
                 for b in dm.train_dataloader() for i in range(len(b["input_ids"]))]
        seen[rank] = (dm.train_language, texts)
    assert [seen[r][0] for r in range(4)] == ["deu", "deu", "fra", "fra"]
    for a, b in ((0, 1), (2, 3)):
        assert not set(seen[a][1]) & set(seen[b][1])
        rows = len(dm.load_rows(seen[a][0], "train"))
        assert len(seen[a][1]) + len(seen[b][1]) == rows // 4 * 4  # full batches of 2 on each replica
        assert all(t.startswith(seen[a][0]) for t in seen[a][1] + seen[b][1])


def with_strategy_layout(trainer, languages, world):
    trainer.strategy = SimpleNamespace(layout=LanguageLayout.build(languages, world))
    return trainer


def test_layout_follows_the_trainer_and_the_strategy(byt5):
    dm = MultilingualDataModule(["deu", "fra", "rus", "jpn"], tokenizer=byt5)
    assert dm.rank_train_languages == ["deu", "fra", "rus", "jpn"]  # no trainer: one process trains all
    dm.trainer = fake_trainer(1, 2)
    assert dm.layout.languages_per_rank == 2 and dm.rank_train_languages == ["rus", "jpn"]
    dm.trainer = fake_trainer(5, 8)
    assert dm.layout.ranks_per_language == 2 and dm.train_language == "rus"
    # The strategy's layout is the one used, when it has one ...
    dm.trainer = with_strategy_layout(fake_trainer(3, 4), ["deu", "fra", "rus", "jpn"], 4)
    assert dm.layout is dm.trainer.strategy.layout and dm.train_language == "jpn"
    # ... also when the strategy was given only a count of languages: the shape is its, the names ours.
    dm.trainer = with_strategy_layout(fake_trainer(1, 2), 4, 2)
    assert dm.layout.names == ("deu", "fra", "rus", "jpn") and dm.rank_train_languages == ["rus", "jpn"]
    dm.trainer = with_strategy_layout(fake_trainer(0, 2), ["deu", "fra"], 2)
    with pytest.raises(ValueError, match=re.escape("the strategy trains the languages (deu, fra), but "
                                                   "data.train_languages is (deu, fra, rus, jpn)")):
        dm.layout


def test_epoch_shuffle_sampler_is_deterministic_and_resumable():
    sampler = EpochShuffleSampler(10, seed=3, language="deu")
    first = list(sampler)
    assert sorted(first) == list(range(10)) and list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and list(EpochShuffleSampler(10, 3, "fra")) != first
    sampler.resume(1, 4)
    assert list(sampler) == second[4:] and list(sampler) == second  # the skip applies once
    assert len(list(EpochShuffleSampler(10, 3, "deu", samples_per_epoch=6))) == 6


# ----- bad data -----


def make(tmp_path, tokenizer, **kwargs):
    options = dict(source=str(tmp_path), file_pattern="{language}.jsonl", tokenizer=tokenizer)
    return MultilingualDataModule(**{"train_languages": ["deu"], **options, **kwargs})


def test_missing_column_names_file_and_available_columns(tmp_path, byt5):
    path = write_jsonl(tmp_path / "deu.jsonl", [{"sentence": "a", "id": 1}])
    message = f"{path}: missing column 'text' (needed by text_field); available columns: sentence, id"
    with pytest.raises(DataError, match=re.escape(message)):
        make(tmp_path, byt5).load_rows("deu", "train")


def test_malformed_json_line(tmp_path, byt5):
    path = tmp_path / "deu.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:3: invalid JSON")):
        make(tmp_path, byt5).load_rows("deu", "train")


def test_malformed_tsv_row(tmp_path, byt5):
    path = write_tsv(tmp_path / "deu.tsv", ("id", "text"), [(1, "a"), (2, "b\tc"), (3, "d")])
    with pytest.raises(DataError, match=re.escape(f"{path}:3: 3 fields, but the header has 2")):
        make(tmp_path, byt5, file_pattern="{language}.tsv").load_rows("deu", "train")


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv"])
def test_invalid_utf8_names_file_line_and_fix(tmp_path, byt5, fmt):
    latin1 = "Grüße".encode("latin-1")
    content = {
        "jsonl": b'{"text": "a"}\n{"text": "' + latin1 + b'"}\n',
        "json": b'[{"text": "a"},\n {"text": "' + latin1 + b'"}]\n',
        "csv": b"text\na\n" + latin1 + b"\n",
        "tsv": b"text\na\n" + latin1 + b"\n",
    }[fmt]
    path = tmp_path / f"deu.{fmt}"
    path.write_bytes(content)
    line = 3 if fmt in ("csv", "tsv") else 2
    message = re.escape(f"{path}:{line}: not valid UTF-8 (byte 0xfc at byte ")
    with pytest.raises(DataError, match=message + r".*re-encode the file as UTF-8: iconv -f latin1 -t utf-8"):
        make(tmp_path, byt5, file_pattern="{language}." + fmt).load_rows("deu", "train")


def test_utf16_file_is_named_as_such(tmp_path, byt5):
    path = tmp_path / "deu.tsv"
    path.write_bytes("text\nhallo\n".encode("utf-16"))
    with pytest.raises(DataError, match=re.escape(f"{path}:1: not valid UTF-8") + ".*iconv -f utf-16 -t utf-8"):
        make(tmp_path, byt5, file_pattern="{language}.tsv").load_rows("deu", "train")


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_header_without_rows(tmp_path, byt5, fmt):
    path = tmp_path / f"deu.{fmt}"
    path.write_text(f"id{',' if fmt == 'csv' else chr(9)}text\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}: has a header (id, text) but no rows")):
        make(tmp_path, byt5, file_pattern="{language}." + fmt).load_rows("deu", "train")


@pytest.mark.parametrize(
    "fmt, content, problem",
    [(fmt, "", "no train rows for language 'deu' (the file is empty)") for fmt in FORMATS]
    + [("jsonl", "\n\n", "no rows, only blank lines"), ("json", "[]", "no rows (an empty JSON array)"),
       ("csv", "\n", "no header and no rows")],
)
def test_files_without_rows_are_named(tmp_path, byt5, fmt, content, problem):
    path = tmp_path / f"deu.{fmt}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}: {problem}")):
        make(tmp_path, byt5, file_pattern="{language}." + fmt).load_rows("deu", "train")


def test_training_language_without_rows(tmp_path, byt5):
    path = tmp_path / "deu.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match=re.escape(f"{path}: no train rows for language 'deu'")):
        make(tmp_path, byt5).setup("fit")


def test_unknown_languages_list_what_is_available(tmp_path, byt5):
    for lang in ("deu", "fra"):
        write_jsonl(tmp_path / f"{lang}.jsonl", [{"text": "a", "lang": lang}])
    with pytest.raises(DataError, match=r"unknown language 'ita'.*languages with such files: deu, fra"):
        make(tmp_path, byt5).load_rows("ita", "train")
    one_file = make(tmp_path, byt5, source=str(tmp_path / "deu.jsonl"), file_pattern=None, language_column="lang")
    with pytest.raises(DataError, match=r"deu.jsonl: unknown language 'ita'.*column 'lang'; languages there: deu"):
        one_file.load_rows("ita", "train")
    with pytest.raises(DataError, match=r"unknown builtin language 'xyz'; available: .*deu.*jpn"):
        MultilingualDataModule(["xyz"], tokenizer=byt5).load_rows("xyz", "train")


def test_empty_after_filtering(tmp_path, byt5):
    path = write_jsonl(tmp_path / "deu.jsonl", [{"text": "   "}, {"text": ""}])
    message = f"{path}: no train examples left for language 'deu': of 2 rows, 2 have empty"
    with pytest.raises(DataError, match=re.escape(message)):
        make(tmp_path, byt5).setup("fit")
    write_jsonl(tmp_path / "deu.jsonl", [{"text": "long enough"}])
    with pytest.raises(DataError, match=r"1 are longer than max_length=4"):
        make(tmp_path, byt5, truncation="drop", max_length=4).setup("fit")


def test_too_long_with_truncation_error(tmp_path, byt5):
    path = write_jsonl(tmp_path / "deu.jsonl", [{"text": "ok"}, {"text": "far too long"}])
    message = re.escape(f"{path}:2: 13 tokens, longer than max_length=8") + ".*truncation='truncate'.*'drop'"
    with pytest.raises(DataError, match=message):
        make(tmp_path, byt5, truncation="error", max_length=8).setup("fit")


def test_label_not_in_labels(tmp_path, byt5):
    path = write_jsonl(tmp_path / "deu.jsonl", [{"text": "a", "y": "sport"}, {"text": "b", "y": "sprot"}])
    message = f"{path}:2: label 'sprot' in column 'y' is not one of labels (sport, news)"
    with pytest.raises(DataError, match=re.escape(message)):
        make(tmp_path, byt5, label_field="y", labels=["sport", "news"]).setup("fit")


def test_parquet_rows_are_named_by_index(tmp_path, byt5):
    path = tmp_path / "all.parquet"
    rows = [{"lang": "deu", "text": "a", "y": "sport"}, {"lang": "deu", "text": "b", "y": "?"}]
    Dataset.from_list(rows).to_parquet(path)
    dm = make(tmp_path, byt5, source=str(path), file_pattern=None, language_column="lang", label_field="y",
              labels=["sport"])
    with pytest.raises(DataError, match=re.escape(f"{path} row 1: label '?' in column 'y' is not one of labels")):
        dm.setup("fit")


def test_invalid_options(byt5):
    with pytest.raises(ValueError, match="truncation='cut' is not one of truncate, drop, error"):
        MultilingualDataModule(["deu"], truncation="cut")
    with pytest.raises(ValueError, match="both seen and unseen: deu"):
        MultilingualDataModule(["deu"], unseen_languages=["deu"])
    with pytest.raises(ValueError, match="placeholder for one file per language"):
        MultilingualDataModule(["deu"], source=".", file_pattern="{split}.tsv")


# ----- builtin corpus -----


def test_builtin_corpus_four_languages_disjoint_splits(byt5):
    languages = ["deu", "rus", "jpn", "ara"]
    dm = MultilingualDataModule(languages[:1], seen_languages=languages, tokenizer=byt5, max_eval_examples=20)
    dm.trainer = fake_trainer()
    for lang in languages:
        split = {stage: [r.data["text"] for r in dm.load_rows(lang, stage)] for stage in STAGES}
        assert len(split["train"]) > 100 and len(split["validation"]) == len(split["test"]) == 20
        assert not set(split["train"]) & set(split["validation"]) and not set(split["train"]) & set(split["test"])
        assert not set(split["validation"]) & set(split["test"])
        assert max(len(t.encode()) for t in split["train"]) <= dm.max_length - 1  # bytes, EOS included
        assert all(not t.startswith("#") for t in split["train"])
    dm.setup("validate")
    # Chunks are cut by UTF-8 bytes, so a byte-level tokenizer truncates nothing, in any script.
    assert all(dm.report[(lang, "validation")]["truncated"] == 0 for lang in languages)
    assert [next(iter(dl))["language"] for dl in dm.val_dataloader()] == languages


# ----- exact resume -----


class Recorder(pl.LightningModule):
    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer  # the DataModule takes it from here
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, _):
        self.seen.append(batch["input_ids"].tolist())
        return (self.weight * batch["input_ids"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path, byt5, ckpt_path=None, max_steps=-1, name="run"):
    dm = MultilingualDataModule(["deu"], source=str(tmp_path / "data"), file_pattern="{language}.jsonl",
                                batch_size=2, seed=7)
    module = Recorder(byt5)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / name, filename="{step}", every_n_train_steps=1,
                                  save_top_k=-1, save_last=True)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=3, max_steps=max_steps, callbacks=[checkpoints], logger=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module.seen


@pytest.mark.filterwarnings("ignore")
def test_resume_mid_epoch_sees_the_same_batches(tmp_path, byt5):
    # 12 rows, batch 2: 6 batches per epoch (the 12 rows are the train part of 14 held-out rows)
    write_jsonl(tmp_path / "data" / "deu.jsonl", [{"text": f"row {i:02d}"} for i in range(14)])
    full = fit(tmp_path, byt5, name="full")
    assert len(full) == 18
    interrupted = fit(tmp_path, byt5, max_steps=14, name="cut")
    assert interrupted == full[:14]
    for step in (4, 6, 13, "last"):  # mid-epoch, at an epoch's end, late, and last.ckpt (step 14)
        resumed_from = 14 if step == "last" else step
        checkpoint = tmp_path / "cut" / ("last.ckpt" if step == "last" else f"step={step}.ckpt")
        resumed = fit(tmp_path, byt5, ckpt_path=checkpoint, name=f"resumed{step}")
        assert full[:resumed_from] + resumed == full, step


def test_max_eval_examples_keeps_evenly_spaced_rows_of_a_label_sorted_file(tmp_path, byt5):
    # 12 rows sorted by label (4 × a, 4 × b, 4 × c), as SIB-200's files are: the first 6 rows would
    # hold labels a and b only; rows ⌊i·12/6⌋ = 0, 2, 4, 6, 8, 10 hold every label twice.
    rows = [{"text": f"sentence {i}", "category": "abc"[i // 4]} for i in range(12)]
    for split in ("train", "dev"):
        (tmp_path / "aaa").mkdir(exist_ok=True)
        write_jsonl(tmp_path / "aaa" / f"{split}.jsonl", rows)
    dm = MultilingualDataModule(["aaa"], source=str(tmp_path), file_pattern="{language}/{split}.jsonl", tokenizer=byt5,
                                splits={"validation": "dev"}, max_eval_examples=6)
    kept = [r.data["text"] for r in dm.load_rows("aaa", "validation")]
    assert kept == [f"sentence {i}" for i in (0, 2, 4, 6, 8, 10)]
    assert len(dm.load_rows("aaa", "train")) == 12  # training rows are never cut
