"""Load run: 64 concurrent streaming clients on a tiny model for a bounded time.

Each client sends streaming requests back to back (varied prompts, some sharing a prefix, 4 to 48 tokens,
greedy or sampled). Passes when there are zero errors and every stream ends with [DONE], and the server's
resident memory (RSS) after the second round is within --rss-tolerance of the first (flat: nothing grows
per request once the prefix cache has filled its budget).

    python eval/load_run.py --seconds 60 --threads 1 --out runs/load_run.json
"""

import argparse
import asyncio
import random
import sys
import time

import httpx

from serving_pressure import Server, random_model, stream, summary, write_json

SYSTEM = "You are a player in a company of actors. Speak in verse, briefly. "


async def round_of_load(base, clients, seconds, seed):
    rng = random.Random(seed)
    results = []

    async def client_loop(client, i):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            shared = SYSTEM * rng.randrange(1, 4) if rng.random() < 0.5 else ""
            body = {"prompt": f"{shared}Client {i}, request {len(results)}: to be, or",
                    "max_tokens": rng.randrange(4, 49), "temperature": rng.choice([0, 0.7, 1.0]),
                    "seed": rng.randrange(1000)}
            results.append(await stream(client, base, body))

    limits = httpx.Limits(max_connections=clients + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(client_loop(client, i) for i in range(clients)))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a saved model directory (default: a random tiny one)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60, help="length of each of the two rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rss-tolerance", type=float, default=0.05)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = args.model or random_model(hidden_size=64, layers=2, heads=4)
    report = {"settings": {**vars(args), "model": model}, "rounds": []}
    with Server(model, threads=args.threads, max_batch=32, max_queue=64, prefix_cache_bytes=16 * 2**20) as server:
        asyncio.run(round_of_load(server.base, args.clients, min(10.0, args.seconds), seed=0))  # warm up
        report["rss_mib_after_warm_up"] = server.rss_mib()
        for round_index in (1, 2):
            started = time.monotonic()
            results = asyncio.run(round_of_load(server.base, args.clients, args.seconds, seed=round_index))
            wall = time.monotonic() - started
            errors = [e for r in results for e in r["errors"]]
            row = {"requests": len(results), "errors": len(errors), "error_samples": errors[:5],
                   "without_done": sum(not r["done"] for r in results),
                   "tokens": sum(len(r["times"]) for r in results), "wall_s": wall,
                   "ttft_s": summary([r["times"][0] - r["start"] for r in results if r["times"]]),
                   "rss_mib": server.rss_mib()}
            report["rounds"].append(row)
            print(f"round {round_index}: {args.clients} clients, {row['requests']} streams in {wall:.0f} s, "
                  f"{row['tokens'] / wall:.0f} tokens/s, errors {row['errors']}, without [DONE] "
                  f"{row['without_done']}, TTFT p50 {row['ttft_s']['p50']:.2f} s p99 {row['ttft_s']['p99']:.2f} s, "
                  f"server RSS {row['rss_mib']:.0f} MiB", flush=True)
        report["metrics"] = {name: server.metric(name) for name in (
            "spikelm_cancelled_sequences_total", "spikelm_failed_sequences_total", "spikelm_prefix_cache_hits_total",
            "spikelm_prefix_cache_bytes")}
    first, second = report["rounds"]
    growth = (second["rss_mib"] - first["rss_mib"]) / first["rss_mib"]
    report["rss_growth_round_2"] = growth
    report["passed"] = (all(r["errors"] == 0 and r["without_done"] == 0 for r in report["rounds"])
                        and abs(growth) <= args.rss_tolerance)
    print(f"RSS after warm-up {report['rss_mib_after_warm_up']:.0f} MiB, after round 1 {first['rss_mib']:.0f} MiB, "
          f"after round 2 {second['rss_mib']:.0f} MiB ({growth:+.1%}); {'PASSED' if report['passed'] else 'FAILED'}")
    write_json(args.out, report)
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
