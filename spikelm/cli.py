"""The `spikelm` command: one program, a subcommand per job.

Each subcommand lives in a module that defines `add_arguments(parser)` and `run(args) -> int`; only the
module of the chosen subcommand is imported, so `spikelm serve` does not load the training stack.
A SpikeLMError (bad input) is printed as one line that says what is wrong and what to do, exit code 2.
"""

import argparse
import importlib
import sys

from .errors import SpikeLMError

# name -> (module, one-line help). Later issues add theirs here.
COMMANDS = {
    "tokenizer": ("spikelm.tokenizer", "train a SentencePiece tokenizer on a corpus, saved for AutoTokenizer"),
    "train": ("spikelm.training", "train a spikelm model (or fine-tune a saved one) on a corpus"),
    "generate": ("spikelm.generation", "generate text from a saved model and print energy per token"),
    "serve": ("spikelm.serving.cli", "serve a saved model over HTTP (OpenAI-compatible)"),
    "distill": ("spikelm.distillation", "train a spikelm student from an ANN teacher (CE + KL)"),
    "convert": ("spikelm.conversion", "train an ANN twin with QCFS activations and convert it to spikes"),
    "eval": ("spikelm.evaluation", "perplexity, bits per byte and the energy report of a saved model"),
    "bench": ("spikelm.benchmark", "spikelm against a same-shape GPT-2: training, prefill, decode, memory"),
}


def build_parser(only=None):
    parser = argparse.ArgumentParser(prog="spikelm", description="Spiking language models.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == only:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only=command)
    args = parser.parse_args(argv)
    if command is None:
        parser.print_help()
        return 2
    try:
        return importlib.import_module(COMMANDS[command][0]).run(args) or 0
    except SpikeLMError as error:
        print(f"spikelm {command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spikelm {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
