import math

import torch

from spikelm import SpikeLMForCausalLM
from spikelm.distillation import distillation_loss
from conftest import tiny_config


def softmax(values, tau):
    exps = [math.exp(v / tau) for v in values]
    return [e / sum(exps) for e in exps]


def test_loss_equals_a_value_computed_by_hand():
    # two positions with labels (the last position has no next token), V = 3
    student = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [9.0, 9.0, 9.0]]])
    teacher = torch.tensor([[[0.0, 1.0, 0.0], [1.0, -1.0, 2.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[7, 1, 2]])  # the label at position 0 is never used (shifted away)
    alpha, tau = 0.3, 2.0
    ce, kl = 0.0, 0.0
    for position, target in ((0, 1), (1, 2)):
        s, t = student[0, position].tolist(), teacher[0, position].tolist()
        ce += -math.log(softmax(s, 1.0)[target])
        p_t, p_s = softmax(t, tau), softmax(s, tau)
        kl += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    expected = (1 - alpha) * ce / 2 + alpha * tau ** 2 * kl / 2
    loss = distillation_loss(student, teacher, labels, alpha=alpha, temperature=tau)
    assert abs(loss.item() - expected) < 1e-6


def test_gradient_is_zero_for_identical_logits_at_alpha_one():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    loss = distillation_loss(logits, logits.detach().clone(), labels, alpha=1.0, temperature=3.0)
    loss.backward()
    assert loss.item() < 1e-6
    assert logits.grad.abs().max() < 1e-6
    # and not zero when the logits differ
    other = torch.randn(2, 5, 11, requires_grad=True)
    distillation_loss(other, logits.detach(), labels, alpha=1.0, temperature=3.0).backward()
    assert other.grad.abs().max() > 1e-4


def test_a_few_distillation_steps_lower_the_kl_to_the_teacher():
    torch.manual_seed(0)
    teacher = SpikeLMForCausalLM(tiny_config("ssa")).eval()
    student = SpikeLMForCausalLM(tiny_config("sdsa"))
    batch = torch.randint(0, 48, (8, 24))
    with torch.no_grad():
        teacher_logits = teacher(batch, use_cache=False).logits

    def kl():
        with torch.no_grad():
            return distillation_loss(student(batch, use_cache=False).logits, teacher_logits, batch, alpha=1.0,
                                     temperature=1.0).item()

    before = kl()
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    for _ in range(20):
        loss = distillation_loss(student(batch, use_cache=False).logits, teacher_logits, batch, alpha=0.9,
                                 temperature=2.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert kl() < 0.7 * before
