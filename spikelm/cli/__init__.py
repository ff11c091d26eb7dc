"""The `spikelm` command: one program, a subcommand per job.

Each subcommand is a small module here that defines `add_arguments(parser)` and `run(args) -> int` and calls
the library's typed functions; only the module of the chosen subcommand is imported, so `spikelm serve` does
not load the training stack. Nothing in the library imports this package.
A SpikeLMError (bad input) is printed as one line that says what is wrong and what to do, exit code 2.
"""

import argparse
import importlib
import shlex
import sys

from ..errors import SpikeLMError

# name -> one-line help; the module is spikelm.cli.<name>
COMMANDS = {
    "tokenizer": "train a SentencePiece tokenizer on a corpus, saved for AutoTokenizer",
    "train": "train a spikelm model (or fine-tune a saved one) on a corpus",
    "generate": "generate text from a saved model and print energy per token",
    "serve": "serve a saved model over HTTP (OpenAI-compatible)",
    "distill": "train a spikelm student from an ANN teacher (CE + KL)",
    "convert": "train an ANN twin with QCFS activations and convert it to spikes",
    "eval": "perplexity, bits per byte and the energy report of a saved model",
    "bench": "spikelm against a same-shape GPT-2: training, prefill, decode, memory",
}


def command_module(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def build_parser(only=None):
    parser = argparse.ArgumentParser(prog="spikelm", description="Spiking language models.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == only:
            command_module(name).add_arguments(sub)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only=command)
    args = parser.parse_args(argv)
    if command is None:
        parser.print_help()
        return 2
    args.command_line = shlex.join(["spikelm", *argv])  # what made a model, for its card
    try:
        return command_module(command).run(args) or 0
    except SpikeLMError as error:
        print(f"spikelm {command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spikelm {command}: interrupted", file=sys.stderr)
        return 130
