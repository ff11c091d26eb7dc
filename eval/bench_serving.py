"""Benchmark the HTTP server: tokens/s and p50/p99 latency at 1, 8 and 32 streaming clients, batched engine
against one sequence at a time (a `--max-batch 1` server). Writes JSON, prints figures.

    python eval/bench_serving.py --model runs/quickstart --out runs/bench_serving.json

For each server mode (a batched engine, and `--max-batch 1`), start the server in a subprocess, then
for each concurrency level run that many streaming clients, each sending requests back to back, and measure
generated tokens per second over the level's wall time, request latency (p50, p99) and time to first token.
Beside them, the same model's decode rate through plain `generate()` in this process (greedy, batch 1, the same
threads: what `spikelm bench` measures), and the ratios issue 13 asks for: one stream's tokens/s over that
rate, and 32 streams' total over one stream's; and, to tell the engine's time from HTTP's, one stream through
the serving engine in this process with no HTTP. generate() and the batched server's levels take turns
(`--rounds`, 3 by default); each ratio is the median of the rounds' ratios.
Needs httpx (`pip install httpx`, in the dev extra).
"""


import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from serving_pressure import Server  # eval/serving_pressure.py: the real server in a subprocess
from spikelm.errors import SpikeLMError
from spikelm.loading import require_saved_model


TOKEN_CHUNK = b'"choices": [{'  # json.dumps's spacing, as the server writes its chunks


def _percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def _one_request(base, prompt, max_tokens):
    """One streaming completion over a plain socket (HTTP/1.1, `Connection: close`). The client shares this
    machine's two cores with the server, so it does as little as it can: it counts token chunks in the raw bytes
    (a chunk with a choice; the usage chunk has none) instead of parsing HTTP and every event (an httpx client
    took 0.4 of a core at 32 streams). The server sends each event in one HTTP chunk, so the pattern is never cut
    by the chunked framing; `tail` keeps what a read may have cut."""
    host, port = base.removeprefix("http://").split(":")
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    start = time.perf_counter()
    first, tokens, tail, head = None, 0, b"", b""
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        while b"\r\n\r\n" not in head:  # the status line and headers
            data = await reader.read(65536)
            if not data:
                raise RuntimeError("the server closed the connection before answering")
            head += data
        head, _, data = head.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"the server answered {head.splitlines()[0].decode()}")
        done = False
        while True:  # until the server closes the connection
            found = (tail + data).count(TOKEN_CHUNK)
            if found:
                tokens += found
                first = first or time.perf_counter()
            done = done or b"data: [DONE]" in tail + data
            tail = (tail + data)[-(len(TOKEN_CHUNK) - 1):]
            data = await reader.read(65536)
            if not data:
                break
        if not done:
            raise RuntimeError("the stream ended without data: [DONE]")
    finally:
        writer.close()
    end = time.perf_counter()
    return {"latency_s": end - start, "ttft_s": (first or end) - start, "tokens": tokens}


async def _level(base, concurrency, requests, max_tokens):
    queue = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(f"Request {i}: to be, or not to be")
    results = []

    async def worker():
        while not queue.empty():
            results.append(await _one_request(base, queue.get_nowait(), max_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    latencies = [r["latency_s"] for r in results]
    ttfts = [r["ttft_s"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "latency_p50_s": statistics.median(latencies),
            "latency_p99_s": _percentile(latencies, 99), "ttft_p50_s": statistics.median(ttfts),
            "ttft_p99_s": _percentile(ttfts, 99)}


def generate_rate_meter(model_dir, prompt, max_tokens, threads, dtype):
    """-> a function that measures the model's decode tokens/s through plain generate() in this process (median
    step, spikelm.benchmark); the model is loaded once."""
    import torch

    from spikelm.benchmark import generate_decode_s
    from spikelm.loading import load_model, load_tokenizer

    if threads:
        torch.set_num_threads(threads)
    model = load_model(model_dir).to(getattr(torch, dtype)).eval()
    ids = torch.tensor([load_tokenizer(model_dir)(prompt)["input_ids"]])

    def measure(repeats=8):
        """The median over `repeats` generate() calls (as many as a level's requests): a window about as long
        as the server's, on a VM whose speed drifts."""
        rates = []
        with torch.no_grad():
            for _ in range(repeats):
                seconds, _ = generate_decode_s(model, ids, {"warmup": 2, "decode_tokens": max(1, max_tokens - 3)})
                rates.append(1.0 / seconds)
        return statistics.median(rates)

    return measure


def engine_rate_meter(model_dir, requests, max_tokens, threads, dtype):
    """-> a function that measures one stream's tokens/s through the serving engine in this process, with no
    HTTP (requests back to back, as one client sends them): where the server's time goes, engine or HTTP."""
    import threading

    import torch

    from spikelm.loading import load_model, load_tokenizer
    from spikelm.serving.engine import Engine, SamplingParams

    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir).to(getattr(torch, dtype)).eval()  # a copy of its own: the engine sets it up
    engine = Engine(model, tokenizer, threads=threads, dtype=getattr(torch, dtype))
    engine.start()  # its thread waits idle between measurements; stopped by the caller (returned with measure)

    def measure():
        tokens, done = [0], threading.Semaphore(0)

        def on_event(event):
            tokens[0] += event.token_id is not None
            if event.finish_reason or event.error:
                done.release()

        start = time.perf_counter()
        for i in range(requests):
            engine.submit(tokenizer(f"Request {i}: to be, or not to be")["input_ids"],
                          SamplingParams(max_tokens=max_tokens, temperature=0), on_event)
            done.acquire()
        return tokens[0] / (time.perf_counter() - start)

    return measure, engine.stop


def run_benchmark(model, concurrency=(1, 8, 32), max_tokens=64, requests_per_level=None, max_batch=32,
                  threads=None, dtype="float32", rounds=3, engine_process=True, log=print):
    """Returns {"batched": [level...], "one_at_a_time": [level...], "generate_tokens_per_s", "ratios",
    "rounds": [...], "settings": {...}}.

    This VM's speed drifts by up to 2x within a minute, so generate() and the batched server's levels take turns
    `rounds` times (generate(), then every level, while the server waits idle between them), and each ratio is
    the median of the rounds' own ratios; the levels' figures are their medians over the rounds."""
    report = {"settings": {"model": model, "concurrency": list(concurrency), "max_tokens": max_tokens,
                           "max_batch": max_batch, "threads": threads, "dtype": dtype, "rounds": rounds,
                           "engine_process": engine_process}}
    generate_rate = generate_rate_meter(model, "Request 0: to be, or not to be", max_tokens, threads, dtype)
    generate_rate()  # warm-up
    engine_rate, stop_engine = engine_rate_meter(model, requests_per_level or 8, max_tokens, threads, dtype)
    engine_rate()  # warm-up
    report["rounds"] = []
    for mode, batch in (("batched", max_batch), ("one_at_a_time", 1)):
        with Server(model, max_batch=batch, max_queue=256, max_tokens=4096, threads=threads, dtype=dtype,
                    engine_process=engine_process) as server:
            asyncio.run(_level(server.base, 1, 2, 4))  # warm up
            by_level = {c: [] for c in concurrency}
            for round_index in range(rounds if mode == "batched" else 1):
                if mode == "batched":
                    rate, engine = generate_rate(), engine_rate()
                    log(f"{'generate()':>14}  in process, batch 1: {rate:8.1f} tokens/s; the engine in process, "
                        f"one stream, no HTTP: {engine:8.1f} tokens/s")
                    this_round = {"generate_tokens_per_s": rate, "engine_one_stream_tokens_per_s": engine}
                for c in concurrency:
                    requests = requests_per_level or max(2 * c, 8)
                    level = asyncio.run(_level(server.base, c, requests, max_tokens))
                    by_level[c].append(level)
                    log(f"{mode:>14}  clients {c:>3}  {level['tokens_per_s']:8.1f} tokens/s  "
                        f"latency p50 {level['latency_p50_s']:6.2f} s  p99 {level['latency_p99_s']:6.2f} s  "
                        f"ttft p50 {level['ttft_p50_s']:6.3f} s")
                    if mode == "batched":
                        this_round[f"clients{c}_tokens_per_s"] = level["tokens_per_s"]
                if mode == "batched":
                    report["rounds"].append(this_round)
            report[mode] = [_median_level(by_level[c]) for c in concurrency]
    stop_engine()
    report["generate_tokens_per_s"] = statistics.median(r["generate_tokens_per_s"] for r in report["rounds"])
    report["ratios"] = {}
    if 1 in concurrency:
        per_round = {"one_stream_over_generate": [r["clients1_tokens_per_s"] / r["generate_tokens_per_s"]
                                                  for r in report["rounds"]],
                     "engine_one_stream_over_generate": [r["engine_one_stream_tokens_per_s"] / r["generate_tokens_per_s"]
                                                         for r in report["rounds"]]}
        per_round.update({f"streams{c}_over_one_stream": [r[f"clients{c}_tokens_per_s"] / r["clients1_tokens_per_s"]
                                                          for r in report["rounds"]] for c in concurrency if c != 1})
        report["ratios"] = {name: statistics.median(values) for name, values in per_round.items()}
        report["ratios_rounds"] = per_round
    return report


def _median_level(runs):
    """One level's figures over rounds: the median of each."""
    if len(runs) == 1:
        return runs[0]
    return {key: statistics.median(run[key] for run in runs) if key != "concurrency" else runs[0][key]
            for key in runs[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/quickstart", help="a saved spikelm directory")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens each request generates")
    parser.add_argument("--requests", type=int, default=None, help="requests per level (default 2 x clients, >= 8)")
    parser.add_argument("--max-batch", type=int, default=32, help="the batched server's limit")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each server")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float32",
                        help="the server's (float32: its batch-invariant default)")
    parser.add_argument("--rounds", type=int, default=3, help="turns of generate() and the batched server's levels")
    parser.add_argument("--engine-in-thread", action="store_true",
                        help="the servers' engine in a thread of their process (`spikelm serve --engine-in-thread`)")
    parser.add_argument("--out", default="runs/bench_serving.json")
    args = parser.parse_args()
    require_saved_model(args.model)  # run the quickstart first, or pass --model
    report = run_benchmark(args.model, args.concurrency, args.max_tokens, args.requests, args.max_batch,
                           args.threads, args.dtype, args.rounds, engine_process=not args.engine_in_thread)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    for batched, single in zip(report["batched"], report["one_at_a_time"]):
        print(f"clients {batched['concurrency']:>3}: batched {batched['tokens_per_s']:.1f} tokens/s vs "
              f"one at a time {single['tokens_per_s']:.1f} ({batched['tokens_per_s'] / single['tokens_per_s']:.1f}x)")
    for name, value in report["ratios"].items():
        rounds = ", ".join(f"{v:.2f}" for v in report["ratios_rounds"][name])
        print(f"{name}: {value:.2f} (rounds: {rounds})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SpikeLMError as error:
        print(f"bench_serving: error: {error}", file=sys.stderr)
        sys.exit(2)
