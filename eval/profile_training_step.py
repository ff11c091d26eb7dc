"""Profile one spikelm training step (forward, backward, AdamW) with torch.profiler: the top ops by self time.

    python eval/profile_training_step.py --threads 1 --output runs/profile_training.json

Shape as `spikelm bench` (D=256, 4 layers, 4 heads, MLP 1024, vocabulary 4096, T=4, batch 8 x 256 tokens),
random weights; neurons compiled where they pay and freed memory kept for the next step (both spikelm train's
defaults; --no-keep-freed-memory profiles without). Prints and writes the top ops, each with its share of the
step's self CPU time, and the step's wall time without the profiler (the profiler slows a step down here).
"""

import argparse
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from spikelm import SpikeLMConfig, SpikeLMForCausalLM
from spikelm.allocator import keep_freed_memory
from spikelm.benchmark import FULL, median_time


def profile_step(settings, steps=3, top=5):
    torch.manual_seed(0)
    config = SpikeLMConfig(vocab_size=settings["vocab_size"], hidden_size=settings["hidden_size"],
                           num_hidden_layers=settings["num_hidden_layers"],
                           num_attention_heads=settings["num_attention_heads"],
                           intermediate_size=settings["intermediate_size"], time_steps=settings["time_steps"][0])
    model = SpikeLMForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(config.vocab_size, (settings["train_batch"], settings["train_seq_len"]))

    def step():
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # warm-up (compilation and first-touch costs stay out of the profile), then the wall time without the profiler
    wall = median_time(step, repeats=steps, warmup=2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return {"steps": steps, "self_cpu_ms_per_step": total / steps / 1000,
            "wall_ms_per_step_unprofiled": 1000 * wall,
            "top": [{"op": e.key, "share": e.self_cpu_time_total / total, "calls_per_step": e.count / steps,
                     "self_cpu_ms_per_step": e.self_cpu_time_total / steps / 1000} for e in events[:top]]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output", default="runs/profile_training.json")
    parser.add_argument("--no-keep-freed-memory", dest="keep_freed_memory", action="store_false",
                        help="glibc's allocator as it is (spikelm/allocator.py)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = keep_freed_memory() if args.keep_freed_memory else None
    result = profile_step(dict(FULL), steps=args.steps)
    result["threads"] = torch.get_num_threads()
    result["allocator"] = allocator or "as the process found it"
    for row in result["top"]:
        print(f"{row['op']:<40} {100 * row['share']:5.1f}%  {row['self_cpu_ms_per_step']:8.1f} ms/step  "
              f"{row['calls_per_step']:6.0f} calls/step")
    print(f"self CPU time per step under the profiler: {result['self_cpu_ms_per_step']:.0f} ms; wall time per "
          f"step without it: {result['wall_ms_per_step_unprofiled']:.0f} ms ({result['allocator']})")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
