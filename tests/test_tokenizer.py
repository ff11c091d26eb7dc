"""spikelm.tokenizer: a SentencePiece model trained on a corpus, saved for AutoTokenizer, lossless."""

import pytest
import sentencepiece as spm
from conftest import shakespeare_text
from transformers import AutoTokenizer

from spikelm import cli
from spikelm.errors import SpikeLMError
from spikelm.tokenizer import train_tokenizer

SAMPLES = [
    "  two  spaces, trailing space \n\n\nthree line breaks\tand a tab",
    "characters it never saw: Ωmega, 漢字, 😀, café",
    "numbers 1234567890 and punctuation?!;:",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([shakespeare_text(20_000)], directory, vocab_size=384)
    return directory


def test_round_trip_and_offline_load(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)  # conftest sets HF_HUB_OFFLINE=1
    text = shakespeare_text(20_000)
    for sample in [text[:3000], *SAMPLES]:
        ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == sample
    # it learned merges: fewer tokens than characters on the text it was trained on
    assert len(tokenizer(text[:3000])["input_ids"]) < 0.7 * 3000
    assert len(tokenizer) == 384


def test_same_ids_as_sentencepiece(tokenizer_dir):
    """The reference: the SentencePiece model itself (saved beside the Hugging Face files)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    reference = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    text = shakespeare_text(20_000)
    for sample in [text[5000:8000], *SAMPLES]:
        assert tokenizer(sample, add_special_tokens=False)["input_ids"] == reference.encode(sample)


def test_special_tokens_and_chat_template(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    specials = [tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert specials == [0, 1, 2, 3]
    assert tokenizer.decode([tokenizer.eos_token_id]) == "</s>"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Who art thou?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "user: Who art thou?\nassistant: "


def test_command_and_vocabulary_errors(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_text(20_000), encoding="utf-8")
    assert cli.main(["tokenizer", "--corpus", str(corpus), "--output", str(tmp_path / "tok"),
                     "--vocab-size", "400"]) == 0
    assert len(AutoTokenizer.from_pretrained(tmp_path / "tok")) == 400
    with pytest.raises(SpikeLMError, match="too large for this corpus"):
        train_tokenizer([shakespeare_text(2000)], tmp_path / "big", vocab_size=50_000)
    with pytest.raises(SpikeLMError, match="too small for this corpus"):
        train_tokenizer([shakespeare_text(2000)], tmp_path / "small", vocab_size=40)
