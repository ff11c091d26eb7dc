"""Shared fixtures: tiny configs, a character tokenizer the tests make, the bundled corpus (spikelm/corpus)."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import spikelm  # noqa: E402  (registers the Auto classes)
from spikelm import SpikeLMConfig  # noqa: E402
from spikelm.data import default_corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def tiny_config(attention_type="ssa", **overrides):
    settings = dict(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, time_steps=4,
                    intermediate_size=64, attention_type=attention_type)
    settings.update(overrides)
    return SpikeLMConfig(**settings)


def shakespeare_text(chars=20_000):
    """The first `chars` characters of the corpus the package ships (None: all of it)."""
    return default_corpus().read_text(encoding="utf-8")[:chars]


def make_char_tokenizer(text):
    """A character-level fast tokenizer built from `text` (ids 0..2 are special)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(text))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(chars)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # any character, newlines too
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


@pytest.fixture(scope="session")
def char_tokenizer():
    return make_char_tokenizer(shakespeare_text())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
