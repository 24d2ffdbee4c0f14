"""Finding the HF model and tokenizer in a LightningModule, reading SIB-200 style TSVs, batching."""

import lightning as L
import pytest
import torch

from lightning_moo.data.parallel import encode_batches, load_texts, read_parallel_texts
from lightning_moo.hf import find_causal_lm, resolve_tokenizer
from tiny_lm import TinyLM, make_llama, make_texts, make_tokenizer

HEADER = "index_id\tcategory\ttext\n"


def write(root, lang, body, split="dev"):
    path = root / lang / f"{split}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body, encoding="utf-8")
    return path


class Nested(L.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.wrapper = torch.nn.ModuleDict({"lm": model})


def test_find_causal_lm():
    model = make_llama()
    assert find_causal_lm(TinyLM(model, make_tokenizer(), make_texts(2))) is model
    assert find_causal_lm(Nested(model)) is model
    with pytest.raises(TypeError, match="LightningModule holds no Hugging Face model"):
        find_causal_lm(L.LightningModule())


def test_resolve_tokenizer(tmp_path):
    tokenizer = make_tokenizer()
    module = TinyLM(make_llama(), tokenizer, make_texts(2))
    assert resolve_tokenizer(None, module) is tokenizer
    other = make_tokenizer()
    assert resolve_tokenizer(other, module) is other
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = resolve_tokenizer(tmp_path / "tok", module)
    assert loaded("w1x3 w2x0")["input_ids"] == tokenizer("w1x3 w2x0")["input_ids"]
    with pytest.raises(FileNotFoundError, match="missing"):
        resolve_tokenizer(str(tmp_path / "missing"), module)
    with pytest.raises(ValueError, match="pass tokenizer= .*LightningModule.tokenizer"):
        resolve_tokenizer(None, L.LightningModule())


def test_reads_aligned_texts(tmp_path):
    write(tmp_path, "eng_Latn", HEADER + "7\tsports\tHello there.\n3\ttravel\tGood bye.\n")
    write(tmp_path, "fra_Latn", HEADER + "3\ttravel\tAu revoir.\r\n7\tsports\tBonjour.\r\n")
    write(tmp_path, "deu_Latn", HEADER + "1\tsports\tnur test\n", split="test")  # no dev split: skipped
    assert read_parallel_texts(tmp_path) == {
        "eng_Latn": ["Hello there.", "Good bye."],
        "fra_Latn": ["Bonjour.", "Au revoir."],
    }
    assert read_parallel_texts(tmp_path, ["fra_Latn", "eng_Latn"], max_sentences=1) == {
        "fra_Latn": ["Au revoir."],
        "eng_Latn": ["Good bye."],
    }
    assert load_texts(tmp_path, None, "dev", None) == read_parallel_texts(tmp_path)


@pytest.mark.parametrize(
    "body, message",
    [
        ("", r"dev.tsv: file is empty"),
        (HEADER, r"dev.tsv: header only, no rows"),
        ("index_id\ttext\n1\thi\n", r"dev.tsv:1: header is 'index_id<TAB>text'"),
        (HEADER + "1\tsports\tfine\n2\tsports\n", r"dev.tsv:3: expected 3 tab-separated fields .* found 2"),
        (HEADER + "1\tsports\tfine\n2\ta\tb\tc\n", r"dev.tsv:3: expected 3 .* found 4"),
        (HEADER + "1\tsports\tfine\n1\tsports\tagain\n", r"dev.tsv:3: index_id 1 repeats line 2"),
    ],
)
def test_malformed_file_names_file_and_line(tmp_path, body, message):
    write(tmp_path, "eng_Latn", body)
    with pytest.raises(ValueError, match=message):
        read_parallel_texts(tmp_path, ["eng_Latn"])


def test_misaligned_index_ids(tmp_path):
    write(tmp_path, "eng_Latn", HEADER + "1\ta\tone\n2\ta\ttwo\n")
    write(tmp_path, "fra_Latn", HEADER + "1\ta\tun\n")
    write(tmp_path, "spa_Latn", HEADER + "1\ta\tuno\n2\ta\tdos\n9\ta\tnueve\n")
    with pytest.raises(ValueError, match=r"fra_Latn/dev.tsv: index_id 2 \(line 3 of .*eng_Latn/dev.tsv\) is missing"):
        read_parallel_texts(tmp_path, ["eng_Latn", "fra_Latn"])
    with pytest.raises(ValueError, match=r"spa_Latn/dev.tsv:4: index_id 9 is not in .*eng_Latn/dev.tsv"):
        read_parallel_texts(tmp_path, ["eng_Latn", "spa_Latn"])
    with pytest.raises(FileNotFoundError, match="deu_Latn/dev.tsv does not exist"):
        read_parallel_texts(tmp_path, ["eng_Latn", "deu_Latn"])


def test_load_texts_needs_two_languages_with_sentences():
    with pytest.raises(ValueError, match="at least 2 languages"):
        load_texts({"eng_Latn": ["a"]}, None, "dev", None)
    with pytest.raises(ValueError, match="no sentences for language fra_Latn"):
        load_texts({"eng_Latn": ["a"], "fra_Latn": []}, None, "dev", None)
    with pytest.raises(ValueError, match=r"no texts for languages \['deu_Latn'\]"):
        load_texts({"eng_Latn": ["a"], "fra_Latn": ["b"]}, ["eng_Latn", "deu_Latn"], "dev", None)
    assert load_texts({"e": ["a", "b"], "f": ["c", "d"], "g": ["x"]}, ["f", "e"], "dev", 1) == {"f": ["c"], "e": ["a"]}


def test_encode_batches_pads_right_with_a_mask():
    tokenizer = make_tokenizer()
    sentences = ["w0x1 w0x2 w0x3", "w1x1", "w2x2 w2x3", "w0x9 w1x9 w2x9 w0x0"]
    batches = list(encode_batches(tokenizer, sentences, batch_size=3, max_length=3, device=torch.device("cpu")))
    assert [ids.shape for ids, _ in batches] == [(3, 3), (1, 3)]
    rows = [(ids[r], mask[r]) for ids, mask in batches for r in range(ids.shape[0])]
    for sentence, (ids, mask) in zip(sentences, rows):
        expected = tokenizer(sentence)["input_ids"][:3]  # truncated to max_length
        assert ids[: len(expected)].tolist() == expected
        assert mask.tolist() == [1] * len(expected) + [0] * (3 - len(expected))
        assert ids[len(expected) :].tolist() == [tokenizer.pad_token_id] * (3 - len(expected))
    with pytest.raises(ValueError, match=r"sentence 1 \(''\) encodes to no tokens"):
        list(encode_batches(tokenizer, ["w0x1", ""], 2, 8, torch.device("cpu")))
