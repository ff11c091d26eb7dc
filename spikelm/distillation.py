"""Knowledge distillation: a spikelm student learns from an ANN teacher's softened predictions.

    loss = (1 - alpha) * CE(student, labels) + alpha * tau^2 * KL(softmax(teacher / tau) || softmax(student / tau))

(Hinton, Vinyals & Dean 2015; the tau^2 keeps the soft term's gradients on the scale of the hard one's.)
The teacher is any local AutoModelForCausalLM with the student's vocabulary; it runs in eval mode without
gradients. Everything else (data, checkpoints, resume, accelerate) is `spikelm train`'s.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from .errors import SpikeLMError
from .training import SpikeLMTrainer


def distillation_loss(student_logits, teacher_logits, labels, alpha=0.5, temperature=2.0, ignore_index=-100):
    """student_logits, teacher_logits: [B, N, V]; labels: [B, N] (unshifted, as a causal LM takes them).
    Both terms are means over the positions that have a next-token label."""
    logits = student_logits[:, :-1].float()
    teacher = teacher_logits[:, :-1].float()
    targets = labels[:, 1:]
    keep = targets != ignore_index
    logits, teacher, targets = logits[keep], teacher[keep], targets[keep]  # [M, V], [M, V], [M]
    ce = F.cross_entropy(logits, targets)
    if alpha == 0:
        return ce
    # KL(p_teacher || p_student) per position, summed over the vocabulary, averaged over positions
    kl = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(teacher / temperature, -1),
                  log_target=True, reduction="batchmean")
    return (1 - alpha) * ce + alpha * temperature ** 2 * kl


# ================================================================ the `spikelm distill` command


class DistillationTrainer(SpikeLMTrainer):
    """SpikeLMTrainer whose training loss is `distillation_loss` against a frozen teacher. Evaluation keeps the
    plain cross-entropy, so held-out loss and bits per byte compare with any other run."""

    # compute_loss returns a per-batch mean: Trainer must still divide it by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(self, *args, teacher, alpha: float, temperature: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                                          use_cache=False).logits
        loss = distillation_loss(outputs.logits, teacher_logits, labels, self.alpha, self.temperature)
        return (loss, outputs) if return_outputs else loss


def load_teacher(path, tokenizer, student_vocab_size=None):
    """Any local causal LM; its vocabulary must be the student's (same tokenizer, same logits)."""
    if not Path(path, "config.json").exists():
        raise SpikeLMError(f"no saved model in {path}: pass --teacher a directory written by `spikelm train` "
                           f"(for example with --arch gpt2) or save_pretrained")
    teacher = AutoModelForCausalLM.from_pretrained(path)
    expected = student_vocab_size or len(tokenizer)
    if teacher.config.vocab_size != expected:
        raise SpikeLMError(f"the teacher {path} has a vocabulary of {teacher.config.vocab_size} tokens and the "
                           f"student {expected}: distillation needs the same tokenizer; train the teacher with "
                           f"--tokenizer pointing at the student's")
    from .tokenizer import has_tokenizer, load_tokenizer

    if has_tokenizer(path) and load_tokenizer(path).get_vocab() != tokenizer.get_vocab():
        raise SpikeLMError(f"the teacher {path} uses a different tokenizer from the student's: distillation "
                           f"needs the same one; pass --tokenizer {path}")
    return teacher


def add_arguments(parser):
    from .training import add_arguments as add_training_arguments

    add_training_arguments(parser)
    group = parser.add_argument_group("distillation")
    group.add_argument("--teacher", required=True, help="a local causal LM directory sharing the vocabulary")
    group.add_argument("--alpha", type=float, default=0.5, help="weight of the KL term (0: plain training)")
    group.add_argument("--temperature", type=float, default=2.0, help="softening temperature tau")


def run(args) -> int:
    from .training import train

    if not 0.0 <= args.alpha <= 1.0:
        raise SpikeLMError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.temperature <= 0:
        raise SpikeLMError(f"--temperature must be positive, got {args.temperature}")
    if args.tokenizer is None and args.model is None:
        args.tokenizer = args.teacher  # the student shares the teacher's tokenizer
    state = {}

    def build_student(args, settings, tokenizer):
        from .training import _build_model

        student = _build_model(args, settings, tokenizer)
        state["teacher"] = load_teacher(args.teacher, tokenizer, student.config.vocab_size)
        return student

    class Trainer(DistillationTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, teacher=state["teacher"], alpha=args.alpha, temperature=args.temperature, **kw)

    train(args, build_model=build_student, trainer_class=Trainer)
    return 0
