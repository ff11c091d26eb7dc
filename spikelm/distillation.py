"""Knowledge distillation: a spikelm student learns from an ANN teacher's softened predictions.

    loss = (1 - alpha) * CE(student, labels) + alpha * tau^2 * KL(softmax(teacher / tau) || softmax(student / tau))

(Hinton, Vinyals & Dean 2015; the tau^2 keeps the soft term's gradients on the scale of the hard one's.)
The teacher is any causal LM with the student's vocabulary (spikelm.loading.load_model); it runs in eval mode
without gradients. Everything else (data, checkpoints, resume, accelerate) is spikelm.training's:

    teacher = load_model("runs/gpt2")
    data = prepare_data(options, tokenizer="runs/gpt2")
    check_teacher(teacher, data.tokenizer)
    distill(build_config("small", data.tokenizer), teacher, data, options, alpha=0.5, temperature=2.0)
"""

import torch
import torch.nn.functional as F

from .errors import SpikeLMError
from .loading import load_tokenizer
from .training import SpikeLMTrainer, TrainingData, TrainingOptions, train


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


# ================================================================ training against a teacher


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


def _tokenizer_or_none(name, revision):
    try:
        return load_tokenizer(name, revision)
    except SpikeLMError:
        return None


def check_teacher(teacher, tokenizer, student_vocab_size=None, teacher_path=None, revision=None):
    """Refuse a teacher whose logits do not index the student's vocabulary: another size, or (when its
    directory or hub repository `teacher_path` holds a tokenizer) other tokens."""
    name = teacher_path or "the teacher"
    expected = student_vocab_size or len(tokenizer)
    if teacher.config.vocab_size != expected:
        raise SpikeLMError(f"the teacher {name} has a vocabulary of {teacher.config.vocab_size} tokens and the "
                           f"student {expected}: distillation needs the same tokenizer; train the teacher with "
                           f"--tokenizer pointing at the student's")
    teachers_own = _tokenizer_or_none(teacher_path, revision) if teacher_path is not None else None
    if teachers_own is not None and teachers_own.get_vocab() != tokenizer.get_vocab():
        raise SpikeLMError(f"the teacher {teacher_path} uses a different tokenizer from the student's: "
                           f"distillation needs the same one; pass --tokenizer {teacher_path}")


def check_weights(alpha: float, temperature: float):
    if not 0.0 <= alpha <= 1.0:
        raise SpikeLMError(f"--alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise SpikeLMError(f"--temperature must be positive, got {temperature}")


def distill(config_or_model, teacher, data: TrainingData, options: TrainingOptions, alpha=0.5, temperature=2.0,
            callbacks=()):
    """spikelm.training.train with the loss of `distillation_loss` against `teacher` (a model, frozen here).
    -> the Trainer."""
    check_weights(alpha, temperature)
    return train(config_or_model, data, options, trainer_class=DistillationTrainer,
                 trainer_kwargs=dict(teacher=teacher, alpha=alpha, temperature=temperature), callbacks=callbacks)
