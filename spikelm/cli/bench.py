"""`spikelm bench`: spikelm against a same-shape Hugging Face GPT-2, side by side in one run.

    spikelm bench --output runs/bench.json            # D=256, 4 layers, 4 heads, vocab 4096, T=4
    spikelm bench --quick                             # small shapes, two contexts: under a minute

What is measured and how: spikelm/benchmark.py.
"""

import json
import os
from pathlib import Path

from ..benchmark import FULL, QUICK  # plain data: the benchmark module imports torch only when it measures
from ..errors import SpikeLMError



def add_arguments(parser):
    parser.add_argument("--quick", action="store_true", help="small shapes, two contexts: under a minute")
    parser.add_argument("--preset", default=None, help="take the shape from a preset (tiny, small, base, medium)")
    parser.add_argument("--hidden-size", type=int, default=None, help=f"D (default {FULL['hidden_size']})")
    parser.add_argument("--layers", type=int, default=None, help=f"default {FULL['num_hidden_layers']}")
    parser.add_argument("--heads", type=int, default=None, help=f"default {FULL['num_attention_heads']}")
    parser.add_argument("--intermediate-size", type=int, default=None, help="MLP width (default 4 D)")
    parser.add_argument("--vocab-size", type=int, default=None, help=f"default {FULL['vocab_size']}")
    parser.add_argument("--time-steps", type=int, nargs="+", default=None, help="spikelm T, one model each (default 4)")
    parser.add_argument("--attention-type", choices=("ssa", "sdsa"), default="ssa")
    parser.add_argument("--contexts", type=int, nargs="+", default=None, help="default 128 512 2048 4096")
    parser.add_argument("--train-batch", type=int, default=None, help="training batch (default 8)")
    parser.add_argument("--train-seq-len", type=int, default=None, help="training sequence length (default 256)")
    parser.add_argument("--decode-tokens", type=int, default=None, help="decode steps timed per context (default 32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats, medians reported (default 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 1)")
    parser.add_argument("--decode-passes", type=int, default=None,
                        help="passes through the contexts timing every model's decode from a kept state, close "
                             "together; a decode ratio is the median of the passes' ratios (default 7)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds through the contexts, the models taking turns at each; a ratio is the "
                             "median of the rounds' ratios (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--compile-neurons", action="store_true",
                        help="spikelm with the compiled neuron kernels (torch.compile; adds compilation time)")
    parser.add_argument("--compile-decode", action="store_true",
                        help="also time each spikelm model with its one-token decode step compiled "
                             "(model.compile_decode(); adds a compilation)")
    parser.add_argument("--no-keep-freed-memory", dest="keep_freed_memory", action="store_false",
                        help="train both models with glibc's allocator as it is, instead of keeping freed memory "
                             "for reuse as `spikelm train` does (spikelm/allocator.py)")
    parser.add_argument("--device", default=None, help="cpu (default) or cuda: the models, data and timings there")
    parser.add_argument("--output", default="runs/bench.json", help="JSON file; the Markdown goes beside it (.md)")


def settings_from_args(args):
    settings = dict(QUICK if args.quick else FULL)
    if args.preset:
        from ..presets import preset

        shape = preset(args.preset)
        settings.update({k: shape[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                               "vocab_size")})
        settings["intermediate_size"] = shape.get("intermediate_size") or 4 * shape["hidden_size"]
        settings["time_steps"] = [shape.get("time_steps", 4)]
    flags = {"hidden_size": args.hidden_size, "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
             "vocab_size": args.vocab_size, "time_steps": args.time_steps, "contexts": args.contexts,
             "train_batch": args.train_batch, "train_seq_len": args.train_seq_len,
             "decode_tokens": args.decode_tokens, "repeats": args.repeats, "warmup": args.warmup,
             "rounds": args.rounds, "decode_passes": args.decode_passes}
    settings.update({k: v for k, v in flags.items() if v is not None})
    if args.intermediate_size is not None:
        settings["intermediate_size"] = args.intermediate_size
    elif args.hidden_size is not None and not args.preset:
        settings["intermediate_size"] = 4 * args.hidden_size
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "train_batch", "train_seq_len", "decode_tokens", "repeats", "rounds", "decode_passes"):
        if settings[key] < 1:
            raise SpikeLMError(f"--{key.replace('_', '-')} must be at least 1 (got {settings[key]})")
    if settings["warmup"] < 0:
        raise SpikeLMError(f"--warmup must not be negative (got {settings['warmup']})")
    if min(settings["contexts"]) < 1 or min(settings["time_steps"]) < 1:
        raise SpikeLMError("--contexts and --time-steps must be positive")
    if settings["hidden_size"] % settings["num_attention_heads"]:
        raise SpikeLMError(f"--hidden-size {settings['hidden_size']} must be divisible by --heads "
                           f"{settings['num_attention_heads']}")
    settings["contexts"] = sorted(set(settings["contexts"]))
    settings["energy_context"] = min(settings["energy_context"], max(settings["contexts"]))
    settings["attention_type"] = args.attention_type
    settings["dtype"] = "float32"
    settings["compile_neurons"] = args.compile_neurons
    settings["compile_decode"] = args.compile_decode
    settings["device"] = args.device or "cpu"
    settings["keep_freed_memory"] = args.keep_freed_memory
    if settings["device"].startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SpikeLMError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")
    return settings


def command_line(args):
    """The flags that were given, as a command line to rerun (recorded in the JSON)."""
    words = ["spikelm", "bench"]
    for key, value in vars(args).items():
        if key == "keep_freed_memory":  # a store_false flag
            words += [] if value else ["--no-keep-freed-memory"]
            continue
        if key in ("command", "command_line", "output") or value is None or value is False:
            continue
        words.append("--" + key.replace("_", "-"))
        if value is not True:
            words += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return " ".join(words)


def run(args) -> int:
    if args.threads is not None and args.threads < 1:
        raise SpikeLMError(f"--threads must be at least 1 (got {args.threads})")
    settings = settings_from_args(args)
    import torch

    from ..benchmark import run_benchmark
    from ..reporting import benchmark_markdown

    torch.set_num_threads(args.threads or os.cpu_count())
    report = run_benchmark(settings)
    report["command"] = command_line(args)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    markdown = benchmark_markdown(report)
    output.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {output} and {output.with_suffix('.md')}")
    return 0
