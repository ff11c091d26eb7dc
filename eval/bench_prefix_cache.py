"""Prefix-state cache: time to first token of a 1,000-token shared system prompt + a short question.

The same requests go to a server without the cache (every prompt prefilled in full: "cold") and to one with
it: its first request is cold too; the second one keeps a snapshot where it parts from the first (the end of
the shared prompt); every later one ("warm") resumes from that snapshot and prefills only its question.
Prints the TTFT medians and their ratio, and the cache counters from /metrics.

    python eval/bench_prefix_cache.py --threads 1 --out runs/bench_prefix_cache.json
"""

import argparse
import asyncio
import statistics

import httpx

from serving_pressure import Server, random_model, stream, write_json

SHARED_TOKENS = 1000


async def ttfts(base, prompts):
    """Requests one after another (nothing else running): the time to each one's first token."""
    times = []
    async with httpx.AsyncClient(timeout=600) as client:
        for prompt in prompts:
            result = await stream(client, base, {"prompt": prompt, "max_tokens": 2, "temperature": 0})
            assert result["done"] and not result["errors"], result["errors"]
            times.append(result["times"][0] - result["start"])
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a saved model directory (default: a random one, D=256, 4 layers)")
    parser.add_argument("--questions", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = args.model or random_model()
    from pathlib import Path

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    corpus = (Path(__file__).resolve().parents[1] / "spikelm" / "corpus" / "tinyshakespeare.txt").read_text()
    shared = tokenizer(corpus[:20_000], add_special_tokens=False)["input_ids"][:SHARED_TOKENS]
    questions = [tokenizer(f"\nQuestion {i}: who speaks at line {7 * i + 3}?\nAnswer:",
                           add_special_tokens=False)["input_ids"] for i in range(args.questions)]
    prompts = [shared + q for q in questions]
    report = {"settings": {**vars(args), "model": model, "shared_tokens": SHARED_TOKENS,
                           "question_tokens": [len(q) for q in questions]}}
    with Server(model, threads=args.threads, prefix_cache_bytes=0) as server:
        asyncio.run(ttfts(server.base, [[5, 6, 7]]))  # warm up
        cold = asyncio.run(ttfts(server.base, prompts))
    with Server(model, threads=args.threads) as server:
        asyncio.run(ttfts(server.base, [[5, 6, 7]]))
        cached = asyncio.run(ttfts(server.base, prompts))
        counters = {name: server.metric(f"spikelm_prefix_cache_{name}") for name in
                    ("hits_total", "misses_total", "hit_tokens_total", "bytes", "entries")}
    warm = cached[2:]
    report.update(cold_ttft_s=cold, cached_server_ttft_s=cached, metrics=counters,
                  cold_median_s=statistics.median(cold), warm_median_s=statistics.median(warm),
                  speedup=statistics.median(cold) / statistics.median(warm))
    print(f"TTFT, {SHARED_TOKENS}-token shared prompt + a {min(map(len, questions))}-{max(map(len, questions))}"
          f"-token question: cold (no cache) median {report['cold_median_s'] * 1e3:.1f} ms; with the cache: "
          f"first {cached[0] * 1e3:.1f} ms, second {cached[1] * 1e3:.1f} ms, warm median "
          f"{report['warm_median_s'] * 1e3:.1f} ms  ->  {report['speedup']:.1f}x faster warm")
    print("  /metrics: " + ", ".join(f"spikelm_prefix_cache_{k} {v:g}" for k, v in counters.items()))
    write_json(args.out, report)


if __name__ == "__main__":
    main()
