"""`spikelm eval`: perplexity and bits per byte of a held-out text, and the energy report of a saved model.

    spikelm eval perplexity --model runs/quickstart --data held_out.txt [--json]
    spikelm eval energy --model runs/quickstart --data held_out.txt --output runs/energy.json
"""

import json
from pathlib import Path

from ..errors import SpikeLMError
from ..evaluation import DEFAULT_CHUNK, DEFAULT_ENERGY_TOKENS  # evaluation imports torch only when it runs


def add_arguments(parser):
    sub = parser.add_subparsers(dest="eval_command", metavar="WHAT", required=True)
    ppl = sub.add_parser("perplexity", help="perplexity and bits per byte on a held-out text",
                         description="Perplexity and bits per byte of a saved causal LM on a text file.")
    ppl.add_argument("--model", required=True, help="a saved model: directory or hub id (spikelm or any causal LM)")
    ppl.add_argument("--revision", default=None, help="branch, tag or commit of a hub id")
    ppl.add_argument("--data", required=True, help="a UTF-8 text file")
    ppl.add_argument("--mode", choices=("auto", "recurrent", "window"), default="auto",
                     help="recurrent (spikelm: the whole text, state carried) or sliding window; auto picks")
    ppl.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="tokens per forward, recurrent mode")
    ppl.add_argument("--max-length", type=int, default=None, help="window, sliding mode (default: the model's)")
    ppl.add_argument("--stride", type=int, default=None, help="window step, sliding mode (default: half the window)")
    ppl.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), default="float32")
    ppl.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ppl.add_argument("--json", action="store_true", help="print one JSON object")
    ppl.add_argument("--output", default=None, help="also write the JSON to this file")

    energy = sub.add_parser("energy", help="energy per token and per layer against the same-shape GPT-2",
                            description="Energy report of a saved spikelm model: JSON, Markdown and a PNG plot.")
    energy.add_argument("--model", required=True, help="a saved spikelm model: directory or hub id")
    energy.add_argument("--revision", default=None, help="branch, tag or commit of a hub id")
    energy.add_argument("--data", required=True, help="a UTF-8 text file; its first --tokens tokens are read")
    energy.add_argument("--tokens", type=int, default=DEFAULT_ENERGY_TOKENS, help="tokens to read")
    energy.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="tokens per forward (state carried)")
    energy.add_argument("--e-ac", type=float, default=None, help="pJ per accumulate (default 0.9)")
    energy.add_argument("--e-mac", type=float, default=None, help="pJ per multiply-accumulate (default 4.6)")
    energy.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32",
                        help="prices spikelm's operations, weights and states (and the ANN twin's) at this precision")
    energy.add_argument("--read-pj", type=float, default=None,
                        help="pJ per 64 bits read from memory (default 10: an 8 KiB SRAM; DRAM: about 2000)")
    energy.add_argument("--write-pj", type=float, default=None, help="pJ per 64 bits written (default: --read-pj)")
    energy.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    energy.add_argument("--output", default="runs/energy.json",
                        help="JSON file; the Markdown (.md) and the plot (.png) are written beside it")


def _check_positive(args, *names):
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise SpikeLMError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")


def run(args) -> int:
    _check_positive(args, "chunk", "max_length", "stride", "tokens", "threads")
    import torch

    from ..evaluation import energy_evaluation, perplexity, read_text
    from ..loading import load_model_and_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.eval_command == "perplexity":
        model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, revision=args.revision)
        result = perplexity(model, tokenizer, read_text(args.data), args.chunk, args.max_length, args.stride,
                            args.mode)
        result.update(model=str(args.model), data=str(args.data))
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(result, indent=2))
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{args.model} on {args.data} ({result['mode']}): perplexity {result['perplexity']:.3f}, "
                  f"bits per byte {result['bits_per_byte']:.4f} ({result['predicted_tokens']} tokens predicted, "
                  f"{result['text_bytes']} bytes)")
        return 0

    from ..reporting import energy_markdown, plot_energy

    from ..energy import SRAM_PJ_PER_64_BITS, Prices

    for flag in ("e_ac", "e_mac", "read_pj", "write_pj"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise SpikeLMError(f"--{flag.replace('_', '-')} must not be negative")
    read = SRAM_PJ_PER_64_BITS if args.read_pj is None else args.read_pj
    prices = Prices(args.precision, read_pj_per_64_bits=read,
                    write_pj_per_64_bits=read if args.write_pj is None else args.write_pj)
    model, tokenizer = load_model_and_tokenizer(args.model, "float32", revision=args.revision)
    report = energy_evaluation(model, tokenizer, read_text(args.data), args.tokens, args.chunk, args.e_ac,
                               args.e_mac, prices=prices)
    report.update(model=str(args.model), data=str(args.data))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    markdown = energy_markdown(report)
    output.with_suffix(".md").write_text(markdown)
    plot_energy(report, output.with_suffix(".png"))
    print(markdown)
    print(f"wrote {output}, {output.with_suffix('.md')} and {output.with_suffix('.png')}")
    return 0
