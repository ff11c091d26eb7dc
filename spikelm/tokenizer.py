"""A SentencePiece tokenizer trained on a corpus and saved as a Hugging Face fast tokenizer.

The saved directory loads with `AutoTokenizer.from_pretrained(DIR)` offline. The SentencePiece model is
lossless: no normalisation, spaces kept as they are, line breaks a token of their own, and characters it never
saw fall back to their UTF-8 bytes, so decode(encode(text)) == text for any text.
(Copying the model to DIR/tokenizer.model and loading it with PreTrainedTokenizerFast gives the same ids as
SentencePiece; LlamaTokenizer and the vocab_file= constructors do not.)
"""

import io
import re
import tempfile
from pathlib import Path

from .errors import SpikeLMError

SPECIAL_TOKENS = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
# The chat format of spikelm's own tokenizers, and the server's for tokenizers that bring none:
# "role: content" lines, then "assistant: " to generate from.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
MAX_SENTENCES = 1_000_000  # SentencePiece samples this many lines at most: enough for a good vocabulary


def _sentences(texts):
    # SentencePiece trains on lines; the line break itself is a user-defined piece
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_tokenizer(texts, output_dir, vocab_size=1024, model_type="bpe"):
    """Train on an iterable of strings; save to `output_dir`; return the loaded Hugging Face tokenizer."""
    import sentencepiece as spm
    from transformers import PreTrainedTokenizerFast

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(texts), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            byte_fallback=True, character_coverage=0.9995, user_defined_symbols=["\n"], split_digits=True,
            allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            input_sentence_size=MAX_SENTENCES, shuffle_input_sentence=True, minloglevel=2,
        )
    except RuntimeError as error:
        message = str(error)
        too_high = re.search(r"Vocabulary size (?:is )?too high \((\d+)\).*?<= (\d+)", message)
        too_low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
        if too_high:
            raise SpikeLMError(f"vocabulary size {too_high[1]} is too large for this corpus (at most "
                               f"{too_high[2]}): pass a smaller --vocab-size or a larger corpus") from None
        if too_low:  # every character and the 256 byte pieces need a token
            raise SpikeLMError(f"vocabulary size {too_low[1]} is too small for this corpus (it needs at least "
                               f"{too_low[2]}): pass a larger --vocab-size") from None
        raise SpikeLMError(f"SentencePiece could not train on this corpus: {message.strip()}") from None

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir) as staging:
        (Path(staging) / "tokenizer.model").write_bytes(model.getvalue())
        tokenizer = PreTrainedTokenizerFast.from_pretrained(staging, **SPECIAL_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(output_dir)
    (output_dir / "tokenizer.model").write_bytes(model.getvalue())  # the SentencePiece original, for other tools
    return tokenizer
