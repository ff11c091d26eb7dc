"""Shared parts of the server-under-pressure runs (bench_chunked_prefill.py, bench_prefix_cache.py,
load_run.py): a model to serve, the real server in a subprocess, streaming clients that time every token.

The server runs in its own process (as `spikelm serve` does), so the clients' Python never competes with the
engine for the GIL; it is started through the library (ServeSettings + serve), not through the CLI.
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

import spikelm  # noqa: F401  (registers the Auto classes, so AutoTokenizer knows the saved model)

LAUNCH = ("import json, sys; from spikelm.serving.server import serve; from spikelm.serving.settings import "
          "ServeSettings; serve(ServeSettings(**json.loads(sys.argv[1])), log_level='warning')")


def random_model(directory=None, hidden_size=256, layers=4, heads=4, time_steps=4) -> str:
    """A randomly initialised spikelm of the README's serving-benchmark shape, with a tokenizer trained on the
    bundled corpus: latency does not depend on the weights being trained."""
    import torch

    from spikelm import SpikeLMConfig, SpikeLMForCausalLM
    from spikelm.tokenizer import train_tokenizer

    directory = Path(directory or tempfile.mkdtemp(prefix="spikelm-serving-"))
    corpus = (Path(__file__).resolve().parents[1] / "spikelm" / "corpus" / "tinyshakespeare.txt").read_text()
    tokenizer = train_tokenizer([corpus[:300_000]], directory, vocab_size=1024)
    torch.manual_seed(0)
    config = SpikeLMConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=layers,
                           num_attention_heads=heads, time_steps=time_steps, eos_token_id=tokenizer.eos_token_id)
    SpikeLMForCausalLM(config).save_pretrained(directory)
    return str(directory)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`serve(ServeSettings(...))` in a subprocess; `rss_mib()` reads its resident memory."""

    def __init__(self, model, **settings):
        self.settings = {"model": model, "port": _free_port(), "api_key": None, **settings}
        self.base = f"http://127.0.0.1:{self.settings['port']}"

    def __enter__(self):
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen([sys.executable, "-c", LAUNCH, json.dumps(self.settings)], env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start in 120 s")

    def __exit__(self, *exc):
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def rss_mib(self) -> float:
        """The server's resident memory, its engine process's included."""
        pids, total = [self.process.pid], 0
        while pids:
            pid = pids.pop()
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                pids += [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
                         for c in (t / "children").read_text().split()]
            except FileNotFoundError:  # ended meanwhile
                continue
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        return total / 1024

    def metric(self, name) -> float:
        for line in httpx.get(f"{self.base}/metrics", timeout=10).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)


async def stream(client, base, body) -> dict:
    """One streaming completion: the arrival time of each token chunk, whether [DONE] came, errors."""
    start = time.perf_counter()
    times, done, errors = [], False, []
    async with client.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}) as response:
        if response.status_code != 200:
            return {"start": start, "times": [], "done": False, "errors": [f"HTTP {response.status_code}"]}
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    errors.append(chunk["error"]["message"])
                elif chunk.get("choices"):
                    times.append(time.perf_counter())
    return {"start": start, "times": times, "done": done, "errors": errors}


def gaps(times):
    return [b - a for a, b in zip(times, times[1:])]


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(values) -> dict:
    return {"n": len(values), "p50": statistics.median(values), "p99": percentile(values, 99), "max": max(values)}


def write_json(path, report):
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")
