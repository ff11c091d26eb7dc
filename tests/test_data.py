"""spikelm.data: the corpus formats, the held-out split, packing, bits per byte and the user errors."""

import json
import math

import pytest
from conftest import make_char_tokenizer, shakespeare_text
from datasets import Dataset, DatasetDict

from spikelm.data import bits_per_byte, default_corpus, load_corpus, prepare_blocks
from spikelm.errors import SpikeLMError

TEXT = shakespeare_text(6000)
LINES = TEXT.splitlines(keepends=True)


@pytest.fixture(scope="module")
def tokenizer():
    return make_char_tokenizer(TEXT + "\n")


def test_text_file_keeps_every_character_and_holds_out_the_end(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    corpus = load_corpus(path, held_out_fraction=0.1)
    train, held_out = "".join(corpus.train["text"]), "".join(corpus.held_out["text"])
    assert train + held_out == TEXT  # one row per line, line breaks kept, the held-out part is the end
    assert len(corpus.held_out) == math.ceil(len(LINES) * 0.1)
    assert corpus.held_out_bytes == len(held_out.encode("utf-8"))
    assert not corpus.documents


def test_folder_jsonl_and_saved_dataset(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("".join(LINES[:40]), encoding="utf-8")
    (folder / "b.txt").write_text("".join(LINES[40:]), encoding="utf-8")
    corpus = load_corpus(folder)
    assert "".join(corpus.train["text"]) + "".join(corpus.held_out["text"]) == TEXT

    records = [{"id": i, "body": line} for i, line in enumerate(LINES)]
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    corpus = load_corpus(jsonl, text_field="body")
    assert corpus.documents and corpus.train.column_names == ["text"]
    assert corpus.train[0]["text"] == LINES[0]
    with pytest.raises(SpikeLMError, match="no 'text' field .* --text-field"):
        load_corpus(jsonl)

    saved = tmp_path / "saved"
    DatasetDict(train=Dataset.from_dict({"text": LINES[:50]}),
                validation=Dataset.from_dict({"text": LINES[50:]})).save_to_disk(str(saved))
    corpus = load_corpus(saved)
    assert corpus.train["text"] == LINES[:50] and corpus.held_out["text"] == LINES[50:]


def test_streaming_holds_out_the_first_rows(tmp_path):
    path = tmp_path / "corpus.txt"
    lines = shakespeare_text(60_000).splitlines(keepends=True)
    path.write_text("".join(lines), encoding="utf-8")
    corpus = load_corpus(path, streaming=True)
    assert corpus.held_out["text"] == lines[:len(corpus.held_out)]
    assert next(iter(corpus.train))["text"] == lines[len(corpus.held_out)]


def test_blocks_are_packed_token_ids(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    corpus = load_corpus(path)
    blocks = prepare_blocks(corpus, tokenizer, block_size=32)
    # lines are tokenised one by one, then concatenated
    train_ids = [i for line in corpus.train["text"] for i in tokenizer(line, add_special_tokens=False)["input_ids"]]
    assert len(blocks.train) == len(train_ids) // 32
    assert blocks.train[0]["input_ids"] == train_ids[:32] == blocks.train[0]["labels"]
    assert blocks.train[1]["input_ids"] == train_ids[32:64]
    assert blocks.held_out_tokens == sum(len(tokenizer(line, add_special_tokens=False)["input_ids"])
                                         for line in corpus.held_out["text"])
    assert len(prepare_blocks(corpus, tokenizer, 32, max_held_out_blocks=2).held_out) == 2


def test_bits_per_byte():
    # a uniform guess over 256 byte values, one token per byte: 8 bits per byte
    assert bits_per_byte(math.log(256), tokens=1000, text_bytes=1000) == pytest.approx(8.0)
    assert bits_per_byte(math.log(2), tokens=500, text_bytes=1000) == pytest.approx(0.5)


def test_default_corpus_is_bundled():
    assert default_corpus().is_file() and default_corpus().stat().st_size > 1_000_000


@pytest.mark.parametrize("case, message", [
    ("missing", "corpus not found"),
    ("empty", "is empty"),
    ("blank", "is empty"),
    ("binary", "binary file"),
    ("latin1", "not valid UTF-8"),
    ("empty_folder", "holds no files"),
])
def test_bad_corpora(tmp_path, case, message):
    path = tmp_path / "corpus.txt"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "blank":
        path.write_text("\n\n   \n\n", encoding="utf-8")
    elif case == "binary":
        path.write_bytes(bytes(range(256)) * 8)
    elif case == "latin1":
        path.write_bytes(("Ça, mon cœur" * 50).encode("latin-1", errors="replace") + b"\xe9t\xe9\n")
    elif case == "empty_folder":
        path.mkdir()
    with pytest.raises(SpikeLMError, match=message):
        load_corpus(path)


def test_block_size_larger_than_the_corpus(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT[:400], encoding="utf-8")
    with pytest.raises(SpikeLMError, match="--block-size 512 is larger than .* use a smaller --block-size"):
        prepare_blocks(load_corpus(path), tokenizer, block_size=512)
