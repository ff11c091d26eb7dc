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


DEFAULT_CHUNK_POSITIONS = 256  # positions per chunk of the loss: a [B, 256, V] slice at a time


def _summed_terms(student, teacher, targets, temperature: float, ignore_index: int, with_kl: bool):
    """Sums over one chunk of positions. student, teacher: [B, n, V]; targets: [B, n].
    -> (summed cross-entropy, summed KL(p_teacher || p_student) over the positions that have a label)."""
    logits = student.float().flatten(0, 1)  # [B n, V]: only this chunk is copied to float32
    targets = targets.flatten()
    ce = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    if not with_kl:
        return ce, logits.new_zeros(())
    keep = (targets != ignore_index).to(logits.dtype)
    log_student = F.log_softmax(logits / temperature, -1)
    log_teacher = F.log_softmax(teacher.float().flatten(0, 1) / temperature, -1)
    kl_per_position = F.kl_div(log_student, log_teacher, log_target=True, reduction="none").sum(-1)
    return ce, (kl_per_position * keep).sum()


def distillation_loss(student_logits, teacher_logits, labels, alpha=0.5, temperature=2.0, ignore_index=-100,
                      chunk_positions=DEFAULT_CHUNK_POSITIONS):
    """student_logits, teacher_logits: [B, N, V]; labels: [B, N] (unshifted, as a causal LM takes them).
    Both terms are means over the positions that have a next-token label.

    The terms are summed over chunks of `chunk_positions` positions (None: all at once). With gradients on,
    each chunk is checkpointed: its float32 copies and softmaxes, [B, chunk, V] each, exist for one chunk at a
    time, in the forward and again in the backward, instead of for all N positions (at V = 50k-150k they are
    the largest tensors of a step). The result equals the unchunked one up to float32 summation order."""
    from torch.utils.checkpoint import checkpoint

    positions = student_logits.shape[1] - 1  # the last position has no next token
    targets = labels[:, 1:]
    count = (targets != ignore_index).sum()
    step = positions if chunk_positions is None else chunk_positions
    checkpointed = torch.is_grad_enabled() and student_logits.requires_grad and step < positions
    ce = kl = 0.0
    for start in range(0, positions, step):
        end = min(start + step, positions)
        args = (student_logits[:, start:end], teacher_logits[:, start:end], targets[:, start:end], temperature,
                ignore_index, alpha != 0)
        ce_part, kl_part = checkpoint(_summed_terms, *args, use_reentrant=False) if checkpointed \
            else _summed_terms(*args)
        ce, kl = ce + ce_part, kl + kl_part
    ce = ce / count
    if alpha == 0:
        return ce
    return (1 - alpha) * ce + alpha * temperature ** 2 * (kl / count)


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
