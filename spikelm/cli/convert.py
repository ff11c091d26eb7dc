"""`spikelm convert`: train an ANN twin with QCFS activations, then convert it to IF spiking neurons.

    spikelm convert --preset small --output runs/converted --max-steps 300   # the twin in runs/converted/ann-twin

Every `spikelm train` flag applies but --model and --arch.
"""

from ..errors import SpikeLMError
from . import train as train_command


def add_arguments(parser):
    train_command.add_arguments(parser)
    parser.add_argument("--levels", type=int, default=None,
                        help="QCFS levels = the converted model's time steps (default: the preset's T)")


def run(args) -> int:
    from ..conversion import train_and_convert
    from ..training import build_config, prepare_data

    if args.model:
        raise SpikeLMError("convert trains its own ANN twin from a preset; to fine-tune a converted model, use "
                           "`spikelm distill --model CONVERTED --teacher CONVERTED/ann-twin`")
    if args.arch != "spikelm":
        raise SpikeLMError("convert makes a spikelm model: drop --arch")
    preset_name = train_command.check_preset(args)
    options = train_command.training_options(args)
    data = prepare_data(options, tokenizer=args.tokenizer, vocab_size=train_command.vocab_size(args, preset_name))
    config = build_config(preset_name, data.tokenizer, attention_type=args.attention_type, time_steps=args.time_steps)
    train_and_convert(config, data, options, args.levels)
    return 0
