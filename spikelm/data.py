"""Corpora for training: load text, hold some out, tokenise (with the datasets library, cached), pack into blocks.

A corpus is one of
    a text file (any name but .json/.jsonl)     one row per line, line breaks kept
    a folder of text files                      the same, every file under it in name order
    a JSON Lines file (.jsonl / .json)          one row per record, its `text_field`
    a `datasets` dataset saved with save_to_disk   its `text_field`; a "validation" or "test" split is the
                                                held-out set if there is one
With no path, the bundled default corpus (Tiny Shakespeare, public domain) is used.

Every problem a user can cause (missing, empty, binary or non-UTF-8 files, a block size the corpus cannot
fill) raises SpikeLMError with what to do about it.
"""

import codecs
import math
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from itertools import chain
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict, IterableDataset

from .errors import SpikeLMError

DEFAULT_CORPUS = "tinyshakespeare.txt"
JSON_SUFFIXES = (".json", ".jsonl")
CHECK_BYTES = 16 * 2**20  # how much of each file is checked for binary content and UTF-8 up front
STREAMING_HELD_OUT_ROWS = 1000  # a stream has no known length: its first rows are held out


def default_corpus() -> Path:
    """The bundled corpus, as a real file (importlib.resources: works installed or editable)."""
    return Path(str(resources.files("spikelm") / "corpus" / DEFAULT_CORPUS))


@dataclass
class Corpus:
    train: Dataset | IterableDataset  # one column, "text"
    held_out: Dataset  # always materialised: it is small, and its bytes are counted
    source: str  # what was loaded, for messages
    documents: bool  # rows are documents (JSON records, dataset rows) rather than lines of text

    @property
    def held_out_bytes(self) -> int:
        return sum(len(text.encode("utf-8")) for text in self.held_out["text"])


# ================================================================ checking and loading


@contextmanager
def quiet_datasets():
    """No datasets progress bars ("Generating train split", map): stderr stays for what matters, one line per
    error. `spikelm train` shows Trainer's progress bar instead."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _check_text_file(path: Path):
    """Reject what the text loader would choke on or silently mangle: binary files and invalid UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as file:
        head = file.read(CHECK_BYTES)
    if b"\x00" in head:
        raise SpikeLMError(f"{path} looks like a binary file (it contains NUL bytes): give a UTF-8 text corpus")
    try:
        decoder.decode(head, final=len(head) < CHECK_BYTES)
    except UnicodeDecodeError as error:
        raise SpikeLMError(f"{path} is not valid UTF-8 (byte {error.start}): convert it to UTF-8, e.g. "
                           f"`iconv -f latin1 -t utf-8`") from None


def _text_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".")
                                                                         for part in p.relative_to(folder).parts))
    if not files:
        raise SpikeLMError(f"the corpus folder {folder} holds no files: put text files in it")
    return files


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").exists() or (folder / "state.json").exists()


def _only_text(dataset, text_field: str, source: str):
    columns = dataset.column_names or []
    if text_field not in columns:
        raise SpikeLMError(f"{source} has no {text_field!r} field (it has {', '.join(columns) or 'none'}): "
                           f"pass --text-field with the name of the text column")
    if text_field != "text":
        dataset = dataset.rename_column(text_field, "text")
    return dataset.select_columns(["text"])


def load_corpus(path=None, text_field="text", held_out_fraction=0.1, streaming=False) -> Corpus:
    """Load a corpus and split off a held-out part: the last `held_out_fraction` of its rows (a contiguous
    stretch, so held-out lines are not neighbours of training lines), or the first rows of a stream."""
    path = Path(path) if path is not None else default_corpus()
    if not path.exists():
        raise SpikeLMError(f"corpus not found: {path}: pass --corpus a text file, a folder of text files, a .jsonl "
                           f"file or a dataset saved with save_to_disk (or leave --corpus out for the bundled one)")
    held_out, documents = None, True
    try:
        if path.is_dir() and _is_saved_dataset(path):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, DatasetDict):
                held_split = next((s for s in ("validation", "test") if s in loaded), None)
                train_split = "train" if "train" in loaded else next(s for s in loaded if s != held_split)
                held_out = _only_text(loaded[held_split], text_field, path) if held_split else None
                loaded = loaded[train_split]
            dataset = _only_text(loaded, text_field, path)
            if streaming:
                dataset = dataset.to_iterable_dataset()
        else:
            files = _text_files(path) if path.is_dir() else [path]
            for file in files:
                _check_text_file(file)
            if all(f.stat().st_size == 0 for f in files):
                raise SpikeLMError(f"the corpus {path} is empty: give a file with text in it")
            if all(f.suffix in JSON_SUFFIXES for f in files):
                dataset = datasets.load_dataset("json", data_files=[str(f) for f in files], split="train",
                                                streaming=streaming)
                dataset = _only_text(dataset, text_field, path)
            else:
                documents = False
                dataset = datasets.load_dataset("text", data_files=[str(f) for f in files], split="train",
                                                keep_linebreaks=True, streaming=streaming)
    except (UnicodeDecodeError, datasets.exceptions.DatasetGenerationError) as error:
        raise SpikeLMError(f"could not read the corpus {path}: {error.__cause__ or error}") from None

    if held_out is None:
        if streaming:
            held_out = Dataset.from_list(list(dataset.take(STREAMING_HELD_OUT_ROWS)), features=dataset.features)
            dataset = dataset.skip(STREAMING_HELD_OUT_ROWS)
        else:
            rows = len(dataset)
            if rows < 2:
                raise SpikeLMError(f"the corpus {path} has {rows} row(s) of text; it needs at least two (one to "
                                   f"train on, one held out): give more text")
            held_rows = min(rows - 1, max(1, math.ceil(rows * held_out_fraction)))
            held_out = dataset.select(range(rows - held_rows, rows))
            dataset = dataset.select(range(rows - held_rows))
    if not any(text.strip() for text in held_out["text"]):
        raise SpikeLMError(f"the corpus {path} is empty (no text, or only white space, in its held-out part): "
                           f"give a corpus with text in it")
    return Corpus(train=dataset, held_out=held_out, source=str(path), documents=documents)


def iter_texts(dataset, max_rows=None):
    """The corpus' texts, for training a tokenizer (a stream is read only up to `max_rows`)."""
    for i, row in enumerate(dataset):
        if max_rows is not None and i >= max_rows:
            return
        yield row["text"]


# ================================================================ tokenising and packing


def tokenize(dataset, tokenizer, add_eos: bool):
    """text -> input_ids. Documents (JSON records, dataset rows) end with </s>; lines of a text file do not:
    their line break is already a token."""
    eos = [tokenizer.eos_token_id] if add_eos else []

    def encode(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [row + eos for row in ids]}

    return dataset.map(encode, batched=True, remove_columns=["text"])


def pack(dataset, block_size: int):
    """Concatenate the token ids and cut them into blocks of `block_size` (the last, shorter, block is dropped).
    labels = input_ids: the model shifts them itself."""

    def group(batch):
        ids = list(chain.from_iterable(batch["input_ids"]))
        usable = len(ids) // block_size * block_size
        blocks = [ids[i:i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    # batches of 1000 rows: a block never spans two batches, so up to one block per 1000 rows is lost
    return dataset.map(group, batched=True, batch_size=1000, remove_columns=["input_ids"])


@dataclass
class Blocks:
    train: Dataset | IterableDataset
    held_out: Dataset
    held_out_tokens: int  # tokens in the whole held-out text
    held_out_bytes: int  # its UTF-8 bytes: bits per byte = loss / ln 2 * tokens / bytes


def prepare_blocks(corpus: Corpus, tokenizer, block_size: int, max_held_out_blocks: int | None = None) -> Blocks:
    """Tokenise and pack both parts; fail with a useful message when the corpus cannot fill one block."""
    if block_size < 2:
        raise SpikeLMError(f"--block-size must be at least 2 (got {block_size})")
    held_out_ids = tokenize(corpus.held_out, tokenizer, add_eos=corpus.documents)
    held_out_tokens = sum(len(ids) for ids in held_out_ids["input_ids"])
    held_out = pack(held_out_ids, block_size)
    train = pack(tokenize(corpus.train, tokenizer, add_eos=corpus.documents), block_size)
    if isinstance(train, IterableDataset):
        train_blocks = 1 if next(iter(train), None) is not None else 0
    else:
        train_blocks = len(train)
    if held_out_tokens == 0:
        raise SpikeLMError(f"the corpus {corpus.source} has no text after tokenising: give a corpus with text in it")
    if train_blocks == 0 or len(held_out) == 0:
        part = "training" if train_blocks == 0 else "held-out"
        raise SpikeLMError(f"--block-size {block_size} is larger than the {part} part of the corpus "
                           f"{corpus.source} ({held_out_tokens} held-out tokens): use a smaller --block-size "
                           f"or a larger corpus")
    if max_held_out_blocks is not None and len(held_out) > max_held_out_blocks:
        held_out = held_out.select(range(max_held_out_blocks))
    return Blocks(train=train, held_out=held_out, held_out_tokens=held_out_tokens,
                  held_out_bytes=corpus.held_out_bytes)


def bits_per_byte(loss_nats_per_token: float, tokens: int, text_bytes: int) -> float:
    """Total nats / ln 2 / bytes, with the total estimated as the mean loss per token times the token count of
    the held-out text: compares models whatever their tokenizer."""
    return loss_nats_per_token * tokens / math.log(2) / text_bytes
