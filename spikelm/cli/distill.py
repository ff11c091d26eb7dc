"""`spikelm distill`: train a spikelm student from an ANN teacher's softened predictions (CE + KL).

    spikelm distill --teacher runs/gpt2 --preset small --output runs/distilled --alpha 0.5 --temperature 2
    spikelm distill --model runs/converted --teacher runs/converted/ann-twin --output runs/tuned

Every `spikelm train` flag applies; the student shares the teacher's tokenizer unless told otherwise.
"""

from ..errors import SpikeLMError
from . import train as train_command

STATISTICS_BLOCKS = 16  # training blocks the teacher reads to balance the student's thresholds


def add_arguments(parser):
    train_command.add_arguments(parser)
    group = parser.add_argument_group("distillation")
    group.add_argument("--teacher", required=True, help="a causal LM (directory or hub id) sharing the vocabulary")
    group.add_argument("--teacher-revision", default=None, help="branch, tag or commit of a hub id --teacher")
    group.add_argument("--alpha", type=float, default=0.5, help="weight of the KL term (0: plain training)")
    group.add_argument("--temperature", type=float, default=2.0, help="softening temperature tau")
    group.add_argument("--init-from-teacher", action="store_true",
                       help="start from the teacher's weights (GPT-2 or Llama-style; its width, depth and heads, "
                            "thresholds balanced on its activations; --time-steps sets T) instead of a preset")


def student_from_teacher(teacher, data, args):
    import itertools

    import torch

    from ..teacher_init import init_from_teacher

    rows = [row["input_ids"] for row in itertools.islice(iter(data.blocks.train), STATISTICS_BLOCKS)]
    batches = [torch.tensor(rows[i:i + 4]) for i in range(0, len(rows), 4)]
    return init_from_teacher(teacher, batches, time_steps=args.time_steps or 4,
                             attention_type=args.attention_type or "ssa")


def run(args) -> int:
    from ..distillation import check_teacher, check_weights, distill
    from ..loading import load_model, require_saved_model
    from ..training import build_config, prepare_data

    check_weights(args.alpha, args.temperature)
    if args.init_from_teacher and (args.model or args.preset):
        raise SpikeLMError("--init-from-teacher takes the teacher's shape and weights: drop --model and --preset")
    preset_name = train_command.check_preset(args)
    options = train_command.training_options(args)
    require_saved_model(args.teacher, "--teacher", args.teacher_revision)
    student = load_model(args.model, revision=args.revision) if args.model else None
    # the student shares the teacher's tokenizer unless it is told another or fine-tunes a model with its own
    tokenizer = train_command.given_tokenizer(args, args.teacher, args.teacher_revision)
    data = prepare_data(options, tokenizer=tokenizer, vocab_size=train_command.vocab_size(args, preset_name))
    teacher = load_model(args.teacher, flag="--teacher", revision=args.teacher_revision)
    if args.init_from_teacher:
        student = student_from_teacher(teacher, data, args)
    if student is None:
        student = build_config(preset_name, data.tokenizer, attention_type=args.attention_type,
                               time_steps=args.time_steps, gated_decay=train_command.gated_decay(args))
    student_config = getattr(student, "config", student)  # a model (fine-tuned, from the teacher) or a config
    check_teacher(teacher, data.tokenizer, student_config.vocab_size, args.teacher, args.teacher_revision)
    distill(student, teacher, data, options, args.alpha, args.temperature)
    return 0
