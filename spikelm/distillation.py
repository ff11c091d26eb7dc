"""Knowledge distillation: a spikelm student learns from an ANN teacher's softened predictions.

    loss = (1 - alpha) * CE(student, labels) + alpha * tau^2 * KL(softmax(teacher / tau) || softmax(student / tau))

(Hinton, Vinyals & Dean 2015; the tau^2 keeps the soft term's gradients on the scale of the hard one's.)
The teacher is any local AutoModelForCausalLM with the student's vocabulary; it runs in eval mode without
gradients. Everything else (data, checkpoints, resume, accelerate) is `spikelm train`'s.
"""

import torch
import torch.nn.functional as F


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
