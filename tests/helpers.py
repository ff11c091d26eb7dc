"""What several test files use: a tiny saved model, and the `spikelm` command run inside the test process."""

import contextlib
import io
from dataclasses import dataclass

import torch

from conftest import make_char_tokenizer, shakespeare_text, tiny_config
from spikelm import SpikeLMForCausalLM
from spikelm.cli import main


def save_tiny_model(directory, seed=0, **overrides):
    """A random tiny spikelm and a character tokenizer (multi-byte characters too) saved side by side, as
    `spikelm train` saves them; -> the directory."""
    torch.manual_seed(seed)
    tokenizer = make_char_tokenizer(shakespeare_text(None) + "é€😀")  # every character of the corpus
    settings = dict(vocab_size=len(tokenizer), hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    settings.update(overrides)
    SpikeLMForCausalLM(tiny_config(**settings)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def spikelm(*args, threads=1) -> Run:
    """`spikelm ARGS...` in this process (one torch thread: tiny models gain nothing from more, and the CPUs
    are shared), with what it printed. Cheaper than a subprocess by the interpreter's start-up."""
    out, err = io.StringIO(), io.StringIO()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(arg) for arg in args])
            except SystemExit as exit_:  # argparse refusing the flags
                code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        torch.set_num_threads(before)
    return Run(code, out.getvalue(), err.getvalue())
