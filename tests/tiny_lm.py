"""A tiny randomly initialised Llama, a word-level tokenizer built on the spot, and texts in made-up
languages whose words occupy disjoint token-id ranges; nothing is downloaded."""

import random

import lightning as L
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

LANGUAGES = ("aaa_Latn", "bbb_Latn", "ccc_Latn")
WORDS_PER_LANGUAGE = 10
SPECIALS = ("[PAD]", "[UNK]")


def token_id(language: int, word: int) -> int:
    return len(SPECIALS) + language * WORDS_PER_LANGUAGE + word


def word(language: int, index: int) -> str:
    return f"w{language}x{index}"


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {name: i for i, name in enumerate(SPECIALS)}
    for language in range(len(LANGUAGES)):
        for index in range(WORDS_PER_LANGUAGE):
            vocab[word(language, index)] = token_id(language, index)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def make_texts(sentences: int = 12, seed: int = 0) -> dict[str, list[str]]:
    """Parallel in shape: sentence k has the same (varying) length in every language, so batches pad."""
    rng = random.Random(seed)
    lengths = [rng.randint(2, 9) for _ in range(sentences)]
    return {
        name: [" ".join(word(j, rng.randrange(WORDS_PER_LANGUAGE)) for _ in range(n)) for n in lengths]
        for j, name in enumerate(LANGUAGES)
    }


def make_llama(seed: int = 0, hidden: int = 32, intermediate: int = 64, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(SPECIALS) + len(LANGUAGES) * WORDS_PER_LANGUAGE,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


class TinyLM(L.LightningModule):
    """Wraps the HF model the way a user's module would: attributes ``model`` and ``tokenizer``."""

    def __init__(self, model, tokenizer, texts):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        encoded = [tokenizer(s)["input_ids"] for sentences in texts.values() for s in sentences]
        width = max(len(ids) for ids in encoded)
        self.batch = torch.tensor([ids + [0] * (width - len(ids)) for ids in encoded])

    def training_step(self, batch, _):
        return self.model(input_ids=batch, labels=batch).loss

    def validation_step(self, batch, _):
        self.log("val_loss", self.model(input_ids=batch, labels=batch).loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.batch, batch_size=len(self.batch) // 2)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.batch, batch_size=len(self.batch))
