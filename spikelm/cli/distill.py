"""`spikelm distill`: train a spikelm student from an ANN teacher's softened predictions (CE + KL).

    spikelm distill --teacher runs/gpt2 --preset small --output runs/distilled --alpha 0.5 --temperature 2
    spikelm distill --model runs/converted --teacher runs/converted/ann-twin --output runs/tuned

Every `spikelm train` flag applies; the student shares the teacher's tokenizer unless told otherwise.
"""

from . import train as train_command


def add_arguments(parser):
    train_command.add_arguments(parser)
    group = parser.add_argument_group("distillation")
    group.add_argument("--teacher", required=True, help="a causal LM (directory or hub id) sharing the vocabulary")
    group.add_argument("--teacher-revision", default=None, help="branch, tag or commit of a hub id --teacher")
    group.add_argument("--alpha", type=float, default=0.5, help="weight of the KL term (0: plain training)")
    group.add_argument("--temperature", type=float, default=2.0, help="softening temperature tau")


def run(args) -> int:
    from ..distillation import check_teacher, check_weights, distill
    from ..loading import load_model, require_saved_model
    from ..training import build_config, prepare_data

    check_weights(args.alpha, args.temperature)
    preset_name = train_command.check_preset(args)
    options = train_command.training_options(args)
    require_saved_model(args.teacher, "--teacher", args.teacher_revision)
    student = load_model(args.model, revision=args.revision) if args.model else None
    # the student shares the teacher's tokenizer unless it is told another or fine-tunes a model with its own
    tokenizer = train_command.given_tokenizer(args, args.teacher, args.teacher_revision)
    data = prepare_data(options, tokenizer=tokenizer, vocab_size=train_command.vocab_size(args, preset_name))
    if student is None:
        student = build_config(preset_name, data.tokenizer, attention_type=args.attention_type,
                               time_steps=args.time_steps)
    teacher = load_model(args.teacher, flag="--teacher", revision=args.teacher_revision)
    student_config = student.config if args.model else student
    check_teacher(teacher, data.tokenizer, student_config.vocab_size, args.teacher, args.teacher_revision)
    distill(student, teacher, data, options, args.alpha, args.temperature)
    return 0
