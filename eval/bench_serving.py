"""Benchmark the HTTP server: tokens/s and p50/p99 latency at 1, 8 and 32 streaming clients,
batched engine against one sequence at a time (a `--max-batch 1` server). Writes JSON, prints figures.

    python eval/bench_serving.py --model runs/quickstart --out runs/bench_serving.json
"""

import argparse
import json
import sys
from pathlib import Path

from spikelm.errors import SpikeLMError
from spikelm.serving.benchmark import run_benchmark


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/quickstart", help="a saved spikelm directory")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens each request generates")
    parser.add_argument("--requests", type=int, default=None, help="requests per level (default 2 x clients, >= 8)")
    parser.add_argument("--max-batch", type=int, default=32, help="the batched server's limit")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each server")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--out", default="runs/bench_serving.json")
    args = parser.parse_args()
    if not (Path(args.model) / "config.json").exists():
        raise SpikeLMError(f"{args.model} is not a saved model directory (run the quickstart or pass --model)")
    report = run_benchmark(args.model, args.concurrency, args.max_tokens, args.requests, args.max_batch,
                           args.threads, args.dtype)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    for batched, single in zip(report["batched"], report["one_at_a_time"]):
        print(f"clients {batched['concurrency']:>3}: batched {batched['tokens_per_s']:.1f} tokens/s vs "
              f"one at a time {single['tokens_per_s']:.1f} ({batched['tokens_per_s'] / single['tokens_per_s']:.1f}x)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SpikeLMError as error:
        print(f"bench_serving: error: {error}", file=sys.stderr)
        sys.exit(2)
