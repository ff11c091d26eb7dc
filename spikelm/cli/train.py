"""`spikelm train`: train a spikelm model from scratch (a preset) or fine-tune a saved one.

    spikelm train --output runs/small                       # the bundled corpus, the `small` preset
    spikelm train --corpus my.jsonl --output runs/mine --preset tiny --max-steps 200
    spikelm train --model runs/small --corpus other.txt --output runs/tuned   # fine-tuning
    accelerate launch --config_file train/accelerate/ddp.yaml -m spikelm.cli train ...   # several processes
"""

from ..errors import SpikeLMError
from ..presets import PRESETS

DEFAULT_PRESET = "small"


def add_arguments(parser):
    data = parser.add_argument_group("data")
    data.add_argument("--corpus", default=None,
                      help="text file, folder of text files, .jsonl file or dataset saved with save_to_disk "
                           "(default: the bundled Tiny Shakespeare)")
    data.add_argument("--text-field", default="text", help="text field of JSON records / dataset rows")
    data.add_argument("--streaming", action="store_true",
                      help="stream the corpus instead of loading it (large corpora; needs --max-steps)")
    data.add_argument("--block-size", type=int, default=128, help="tokens per training sequence")
    data.add_argument("--held-out-fraction", type=float, default=0.1, help="share of rows held out for evaluation")
    data.add_argument("--max-eval-blocks", type=int, default=64, help="held-out blocks scored at each evaluation")

    model = parser.add_argument_group("model")
    model.add_argument("--output", required=True, help="directory for checkpoints and the final model")
    model.add_argument("--preset", default=None, help=f"model size: {', '.join(PRESETS)} (default {DEFAULT_PRESET})")
    model.add_argument("--model", default=None, help="fine-tune this saved model instead (a directory or hub id)")
    model.add_argument("--revision", default=None, help="branch, tag or commit of a hub id given to --model")
    model.add_argument("--tokenizer", default=None,
                       help="tokenizer directory (default: the model's, the output dir's, or a new one)")
    model.add_argument("--vocab-size", type=int, default=None, help="size of a newly trained tokenizer "
                                                                    "(default: the preset's)")
    model.add_argument("--arch", choices=("spikelm", "gpt2"), default="spikelm",
                       help="gpt2: a Hugging Face GPT2LMHeadModel of the preset's width, depth and heads, trained "
                            "by the same pipeline (the ANN reference and default distillation teacher)")
    model.add_argument("--attention-type", choices=("ssa", "sdsa"), default=None)
    model.add_argument("--compile-neurons", action="store_true",
                       help="compiled neuron kernels at every size (by default only where they pay)")
    model.add_argument("--time-steps", type=int, default=None)
    model.add_argument("--decay", choices=("fixed", "gated"), default=None,
                       help="attention's forgetting: a fixed decay per head, or gated per token from the input "
                            "spikes (default: the preset's)")
    model.add_argument("--spike-rate-target", type=float, default=None,
                       help="penalise neuron populations firing above this rate (spikes per neuron and step): "
                            "less energy per token for some accuracy; the rates are logged per layer")
    model.add_argument("--spike-rate-weight", type=float, default=10.0, help="the firing-rate penalty's weight")
    model.add_argument("--spike-rate-populations", nargs="+", default=None,
                       help="penalise only neurons whose module name contains one of these (e.g. mlp.hidden_neuron)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--max-steps", type=int, default=None, help="optimiser steps (default: one epoch)")
    optim.add_argument("--epochs", type=float, default=1.0)
    optim.add_argument("--batch-size", type=int, default=16, help="blocks per step and process")
    optim.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    optim.add_argument("--lr", type=float, default=3e-3)
    optim.add_argument("--lr-scheduler", default="cosine")
    optim.add_argument("--warmup", type=float, default=0.05, help="warm-up steps (a number < 1: a share of all)")
    optim.add_argument("--weight-decay", type=float, default=0.01)
    optim.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    optim.add_argument("--seed", type=int, default=0)

    run_group = parser.add_argument_group("run")
    run_group.add_argument("--eval-steps", type=int, default=100)
    run_group.add_argument("--save-steps", type=int, default=200)
    run_group.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept")
    run_group.add_argument("--logging-steps", type=int, default=10)
    run_group.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    run_group.add_argument("--no-keep-freed-memory", dest="keep_freed_memory", action="store_false",
                           help="on the CPU, leave glibc's allocator as it is instead of keeping freed memory for "
                                "the next step (where activations reach 32 MiB, steps about 10%% faster here, for "
                                "the process's peak memory held)")


def training_options(args, **changes):
    """The TrainingOptions the parsed flags describe (`changes`: fields set otherwise, such as the output)."""
    from dataclasses import fields

    from ..training import TrainingOptions

    values = {f.name: getattr(args, f.name) for f in fields(TrainingOptions) if f.name != "command"}
    values["command"] = getattr(args, "command_line", None)
    values.update(changes)
    return TrainingOptions(**values)


def check_preset(args) -> str:
    """The preset's name; --preset with --model is a contradiction, an unknown name fails before any work."""
    from ..presets import preset

    if args.model and args.preset:
        raise SpikeLMError("--preset and --model exclude each other: --model fine-tunes a saved model, whose size "
                           "is fixed")
    name = args.preset or DEFAULT_PRESET
    preset(name)
    return name


def vocab_size(args, preset_name) -> int:
    from ..presets import preset

    return args.vocab_size or preset(preset_name)["vocab_size"]


def given_tokenizer(args, fallback=None, fallback_revision=None):
    """--tokenizer, else the fine-tuned model's, else `fallback` (a name); None: prepare_data decides."""
    from ..loading import load_tokenizer

    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    if args.model:
        return load_tokenizer(args.model, args.revision)
    return load_tokenizer(fallback, fallback_revision) if fallback else None


def gated_decay(args):
    """--decay as the config field (None: the preset's)."""
    return None if args.decay is None else args.decay == "gated"


def run(args) -> int:
    from ..loading import load_model
    from ..training import build_config, gpt2_config, prepare_data, train

    preset_name = check_preset(args)
    options = training_options(args)
    callbacks = []
    if args.spike_rate_target is not None:
        if args.arch == "gpt2":
            raise SpikeLMError("--spike-rate-target penalises spikes: a GPT-2 has none (drop --arch gpt2)")
        from ..spike_rate import SpikeRateRegulariser

        callbacks.append(SpikeRateRegulariser(args.spike_rate_target, args.spike_rate_weight,
                                              args.spike_rate_populations))
    model = load_model(args.model, revision=args.revision) if args.model else None  # fine-tuning: weights, config
    data = prepare_data(options, tokenizer=given_tokenizer(args), vocab_size=vocab_size(args, preset_name))
    if model is None and args.arch == "gpt2":
        model = gpt2_config(preset_name, data.tokenizer, args.block_size)
    elif model is None:
        model = build_config(preset_name, data.tokenizer, attention_type=args.attention_type,
                             time_steps=args.time_steps, gated_decay=gated_decay(args))
    train(model, data, options, callbacks=callbacks)
    return 0
