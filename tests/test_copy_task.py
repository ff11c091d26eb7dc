"""Attention carries information: a tiny model learns to copy a random sequence.

16 random tokens from a vocabulary of 16, then the same 16 again. The repeated half is predictable only
through attention (an induction pattern: with token shift, a key carries the previous token, so the current
token finds where it occurred and reads out what followed it). Chance is 1/16.

The model trains a fixed number of steps on seeded batches, so the test does the same work on any machine
(with this seed it reaches about 0.50 at 600 steps; another batch seed, 0.46).
"""

import torch

from spikelm import SpikeLMForCausalLM
from conftest import tiny_config

VOCAB, HALF = 16, 16
STEPS = 600


def copy_batch(size, generator=None):
    half = torch.randint(0, VOCAB, (size, HALF), generator=generator)
    return torch.cat([half, half], 1)


def repeated_half_accuracy(model, batch):
    with torch.no_grad():
        logits = model(batch, use_cache=False).logits
    predicted = logits[:, HALF - 1:2 * HALF - 1].argmax(-1)  # the predictions of tokens HALF .. 2*HALF-1
    return (predicted == batch[:, HALF:]).float().mean().item()


def test_attention_learns_to_copy_and_zeroing_it_falls_to_chance():
    torch.manual_seed(0)
    config = tiny_config("ssa", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=128)  # the default read-out scale: 64 / d = 2
    model = SpikeLMForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    held_out = copy_batch(512, torch.Generator().manual_seed(1))
    batches = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        batch = copy_batch(32, batches)
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
    accuracy = repeated_half_accuracy(model, held_out)
    print(f"copy task: {accuracy:.3f} after {STEPS} steps")
    assert accuracy >= 0.4, f"accuracy {accuracy:.3f} after {STEPS} steps"

    # the attention branch zeroed: the model can no longer see the first half
    for block in model.model.layers:
        block.attention.register_forward_hook(lambda module, inputs, output: torch.zeros_like(output))
    zeroed = repeated_half_accuracy(model, held_out)
    assert zeroed < 0.1, f"with attention zeroed the accuracy is still {zeroed:.3f} (chance is 0.0625)"
