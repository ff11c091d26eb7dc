"""Chunked prefill: do long prompts stall the streams that are already decoding?

8 streaming clients decode; in the second run 4 requests with 2,048-token prompts arrive while they do. The
figure is the inter-token latency (p50, p99, max) of the 8 streams alone, and while the arrivals are prefilled
(from the first arrival to the last one's first token; over the whole run a single long stall hides below
the 99th percentile), for each
per-step token budget (--step-tokens): the budget is what one engine step may process (one token per
decoding stream, the rest for prompt chunks); a budget over 4 x 2,048 prefills every arrival in one go, as
the server did before chunking.

    python eval/bench_chunked_prefill.py --threads 1 --out runs/bench_chunked_prefill.json
"""

import argparse
import asyncio
import random

import httpx

from serving_pressure import Server, gaps, random_model, stream, summary, write_json

STREAMS, ARRIVALS, PROMPT_TOKENS = 8, 4, 2048


async def run(base, vocab, stream_tokens, with_arrivals, seed=0):
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=32)) as client:
        streams = [asyncio.create_task(stream(client, base, {"prompt": f"Stream {i}: to be, or not to be",
                                                             "max_tokens": stream_tokens, "temperature": 0}))
                   for i in range(STREAMS)]
        arrivals = []
        if with_arrivals:
            await asyncio.sleep(1.0)  # the streams are decoding
            for _ in range(ARRIVALS):
                prompt = [rng.randrange(4, vocab) for _ in range(PROMPT_TOKENS)]  # no shared prefix
                arrivals.append(asyncio.create_task(stream(client, base, {"prompt": prompt, "max_tokens": 4})))
                await asyncio.sleep(0.25)
        results = await asyncio.gather(*streams)
        arrived = await asyncio.gather(*arrivals)
    for result in results + arrived:
        assert result["done"] and not result["errors"], result["errors"]
    itl = [gap for result in results for gap in gaps(result["times"])]
    report = {"itl_s": summary(itl), "arrival_ttft_s": None, "itl_during_arrivals_s": None}
    if arrived:
        window = (arrived[0]["start"], max(r["times"][0] for r in arrived))
        during = [b - a for r in results for a, b in zip(r["times"], r["times"][1:]) if window[0] < b <= window[1]]
        report.update(arrival_ttft_s=summary([r["times"][0] - r["start"] for r in arrived]),
                      itl_during_arrivals_s=summary(during), window_s=window[1] - window[0])
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a saved model directory (default: a random one, D=256, 4 layers)")
    parser.add_argument("--step-tokens", type=int, nargs="+", default=[64, 256, 8200])
    parser.add_argument("--stream-tokens", type=int, default=300, help="tokens each of the 8 streams decodes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = args.model or random_model()
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(model))
    report = {"settings": {**vars(args), "model": model, "streams": STREAMS, "arrivals": ARRIVALS,
                           "prompt_tokens": PROMPT_TOKENS}, "runs": []}
    for step_tokens in args.step_tokens:
        with Server(model, threads=args.threads, step_tokens=step_tokens, prefix_cache_bytes=0, max_batch=32,
                    max_prompt_tokens=PROMPT_TOKENS, max_tokens=4096) as server:
            asyncio.run(run(server.base, vocab, 8, False))  # warm up
            alone = asyncio.run(run(server.base, vocab, args.stream_tokens, False))
            loaded = asyncio.run(run(server.base, vocab, args.stream_tokens, True))
        a, b = alone["itl_s"], loaded["itl_during_arrivals_s"]
        row = {"step_tokens": step_tokens, "alone": alone, "with_arrivals": loaded,
               "p50_ratio": b["p50"] / a["p50"], "p99_ratio": b["p99"] / a["p99"]}
        report["runs"].append(row)
        print(f"step budget {step_tokens:>5}: inter-token latency of the {STREAMS} streams  "
              f"alone p50 {a['p50'] * 1e3:6.1f} ms p99 {a['p99'] * 1e3:6.1f} ms  |  while {ARRIVALS} x "
              f"{PROMPT_TOKENS}-token prompts prefill ({loaded['window_s']:.1f} s) p50 {b['p50'] * 1e3:6.1f} ms "
              f"p99 {b['p99'] * 1e3:7.1f} ms max {b['max'] * 1e3:7.1f} ms  (p50 x{row['p50_ratio']:.2f}, "
              f"p99 x{row['p99_ratio']:.2f}); arrivals' TTFT p50 {loaded['arrival_ttft_s']['p50']:.2f} s",
              flush=True)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
