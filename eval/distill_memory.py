"""Peak memory of one distillation step at a large vocabulary: the loss over all positions at once (as
spikelm computed it before) against the chunked loss of spikelm.distillation, side by side in one process.

    python eval/distill_memory.py --vocab 50257 --batch 8 --positions 128 --output runs/distill_memory.json

The step: a small spikelm student's forward at vocabulary V, the loss against fixed teacher logits, backward.
Peak growth of the resident set size over the step (spikelm.benchmark.PeakRSS, CPU) or CUDA's peak allocation.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from spikelm import SpikeLMConfig, SpikeLMForCausalLM
from spikelm.benchmark import PeakRSS
from spikelm.distillation import DEFAULT_CHUNK_POSITIONS, distillation_loss


def unchunked_loss(student_logits, teacher_logits, labels, alpha=0.5, temperature=2.0, ignore_index=-100):
    """The loss as it was computed before chunking: every [M, V] intermediate at once."""
    logits = student_logits[:, :-1].float()
    teacher = teacher_logits[:, :-1].float()
    targets = labels[:, 1:]
    keep = targets != ignore_index
    logits, teacher, targets = logits[keep], teacher[keep], targets[keep]
    ce = F.cross_entropy(logits, targets)
    kl = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(teacher / temperature, -1),
                  log_target=True, reduction="batchmean")
    return (1 - alpha) * ce + alpha * temperature ** 2 * kl


def step_peak(model, input_ids, teacher_logits, loss_fn, device):
    """Peak memory growth (bytes) of forward + loss + backward; -> (bytes, loss)."""
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = loss_fn(model(input_ids, use_cache=False).logits, teacher_logits, input_ids)
        loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, loss.item()
    with PeakRSS() as memory:
        loss = loss_fn(model(input_ids, use_cache=False).logits, teacher_logits, input_ids)
        loss.backward()
    return memory.growth, loss.item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--positions", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK_POSITIONS // 8, help="positions per chunk")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="runs/distill_memory.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = SpikeLMConfig(vocab_size=args.vocab, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=128, time_steps=2)
    model = SpikeLMForCausalLM(config).to(device)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.positions), device=device)
    teacher_logits = torch.randn(args.batch, args.positions, args.vocab, device=device)

    def chunked(s, t, y):
        return distillation_loss(s, t, y, chunk_positions=args.chunk)

    step_peak(model, input_ids, teacher_logits, chunked, device)  # warm-up: one-off allocations
    before, loss_before = step_peak(model, input_ids, teacher_logits, unchunked_loss, device)
    after, loss_after = step_peak(model, input_ids, teacher_logits, chunked, device)
    logits_bytes = args.batch * args.positions * args.vocab * 4
    report = {"vocab": args.vocab, "batch": args.batch, "positions": args.positions, "chunk": args.chunk,
              "device": device, "logits_bytes": logits_bytes, "peak_before_bytes": before,
              "peak_after_bytes": after, "ratio": after / before, "loss_before": loss_before,
              "loss_after": loss_after}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    mib = 2 ** 20
    print(f"V={args.vocab}, B={args.batch}, N={args.positions} ({device}; one [B, N, V] float32 tensor is "
          f"{logits_bytes / mib:.0f} MiB): peak growth of a distillation step {before / mib:.0f} MiB unchunked, "
          f"{after / mib:.0f} MiB in chunks of {args.chunk} positions ({after / before:.2f}x); loss "
          f"{loss_before:.6f} vs {loss_after:.6f}; wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
