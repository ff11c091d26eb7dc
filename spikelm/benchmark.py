"""spikelm against a same-shape Hugging Face GPT-2, side by side in one run (the measuring behind
`spikelm bench`, whose flags are in spikelm/cli/bench.py).

Same width, depth, heads, MLP width and vocabulary; random weights (the shapes set the cost). Measured:
- training: tokens/s of forward, backward and an AdamW step on a batch of random tokens;
- inference at each context (batch 1, greedy): prefill tokens/s, then decode tokens/s and ms per token
  after the prefill; memory as the state the model carries (GPT-2's keys and values in its DynamicCache,
  spikelm's SpikeLMCache) and the peak growth of the process's resident memory (see PeakRSS);
- the neuron: forward+backward of spikelm's `lif_multistep` against SpikingJelly's LIFNode(step_mode='m')
  (when spikingjelly is installed: `pip install --no-deps spikingjelly loguru`);
- the energy per token of each spikelm model against GPT-2's (spikelm.energy; random weights).
Every time is the median of `--repeats` runs after `--warmup` runs. Inference is run before training, so
that the models are measured with the same initial weights whatever their order.
"""

import ctypes
import datetime
import gc
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path


FULL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, vocab_size=4096,
            time_steps=[4], contexts=[128, 512, 2048, 4096], train_batch=8, train_seq_len=256, decode_tokens=32,
            repeats=5, warmup=1, neuron_shape=[4, 2048, 1024], energy_context=512)
QUICK = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, vocab_size=512,
             time_steps=[4], contexts=[128, 512], train_batch=4, train_seq_len=64, decode_tokens=8, repeats=3,
             warmup=1, neuron_shape=[4, 512, 1024], energy_context=128)

# glibc mallopt parameters. PeakRSS pins the mmap threshold low; afterwards it sets glibc's own steady state
# back (the dynamic threshold ends at 32 MiB, with the trim threshold at twice that). Pinning the threshold
# alone, with the default 128 KiB trim threshold, made a 2-thread GPT-2 forward 20x slower here.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MEMORY = 64 * 2**10
MMAP_THRESHOLD_STEADY, TRIM_THRESHOLD_STEADY = 32 * 2**20, 64 * 2**20


# ================================================================ measuring


def median_time(fn, repeats, warmup):
    """Median wall time of fn() in seconds, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


class PeakRSS:
    """Peak growth of the resident set size during a block, sampled every millisecond by a thread.

    Freed memory that the allocator keeps would hide the growth of a later run, so during the block
    glibc's mmap threshold is pinned at 64 KiB: every tensor of 64 KiB or more gets its own mapping, which
    goes back to the system when the tensor is freed. `growth` is None where this cannot be done (no
    glibc, or no /proc): there the figure would not be reliable.
    """

    def __init__(self):
        self.libc = _libc() if sys.platform.startswith("linux") else None
        self.growth = None

    @staticmethod
    def rss():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.libc is None:
            return self
        gc.collect()
        self.libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MEMORY)
        self.libc.malloc_trim(0)  # return the heap's free tail first, so the baseline is what is in use
        self.baseline = self.peak = self.rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.libc is None:
            return
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.rss())
        self.growth = self.peak - self.baseline
        self.libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_STEADY)
        self.libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_STEADY)


def state_bytes(cache):
    """Bytes of what a model carries from token to token: SpikeLMCache's fixed state, or a KV cache."""
    if hasattr(cache, "state_size_bytes"):
        return cache.state_size_bytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


# ================================================================ the models


def build_models(settings):
    """-> [(name, model)]: GPT-2 first (matched in parameters), then a spikelm model per number of time steps."""
    import torch
    from transformers import GPT2LMHeadModel

    from . import SpikeLMConfig, SpikeLMForCausalLM
    from .references import matched_gpt2_config

    s = settings
    configs = [SpikeLMConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                             num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
                             intermediate_size=s["intermediate_size"], time_steps=T,
                             attention_type=s["attention_type"], bos_token_id=0, eos_token_id=0)
               for T in s["time_steps"]]
    torch.manual_seed(0)
    # room for the prompt and the decoded tokens; as many parameters as spikelm
    gpt2 = GPT2LMHeadModel(matched_gpt2_config(configs[0], max(s["contexts"]) + s["decode_tokens"] + 1))
    models = [("gpt2", gpt2)]
    for config in configs:
        models.append((f"spikelm T={config.time_steps}", SpikeLMForCausalLM(config)))
    return models


def training_speed(model, settings):
    import torch

    batch, seq_len = settings["train_batch"], settings["train_seq_len"]
    ids = torch.randint(settings["vocab_size"], (batch, seq_len))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = median_time(step, settings["repeats"], settings["warmup"])
    model.eval()
    return {"tokens_per_s": batch * seq_len / seconds, "step_s": seconds}


def inference_speed(model, context, settings):
    """Prefill `context` random tokens (median of repeats), then decode greedily `decode_tokens` tokens after
    one more prefill, each step timed (median)."""
    import torch

    prompt = torch.randint(settings["vocab_size"], (1, context))
    with torch.no_grad():
        prefill_s = median_time(lambda: model(prompt, use_cache=True), settings["repeats"], settings["warmup"])
        output = model(prompt, use_cache=True)
        cache = output.cache
        token = output.logits[:, -1:].argmax(-1)  # [1, 1]
        steps = []
        for _ in range(settings["warmup"] + settings["decode_tokens"]):
            start = time.perf_counter()
            output = model(token, cache=cache, use_cache=True)
            token = output.logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - start)
    decode_s = statistics.median(steps[settings["warmup"]:])
    return {"context": context, "prefill_tokens_per_s": context / prefill_s, "prefill_s": prefill_s,
            "decode_tokens_per_s": 1.0 / decode_s, "decode_ms_per_token": 1000.0 * decode_s,
            "state_bytes": state_bytes(cache)}


def memory_growth(model, context, settings):
    """Peak growth of resident memory over a prefill of `context` tokens and the decode steps after it.
    Run after every timing: PeakRSS changes the allocator's settings, which would slow the timed code."""
    import torch

    prompt = torch.randint(settings["vocab_size"], (1, context))
    with torch.no_grad(), PeakRSS() as memory:
        output = model(prompt, use_cache=True)
        for _ in range(settings["decode_tokens"]):
            output = model(output.logits[:, -1:].argmax(-1), cache=output.cache, use_cache=True)
        del output
    return memory.growth


def neuron_speed(settings):
    """Forward+backward of a multi-step LIF over a [T, N, D] float32 tensor: ours, SpikingJelly's, and one
    ReLU pass as a yardstick. Both neurons: leak 1/2 (SpikingJelly's tau=2), threshold 1, soft reset,
    arctan surrogate."""
    import torch

    from .neurons import lif_multistep

    current = torch.randn(*settings["neuron_shape"]).requires_grad_()
    grad = torch.randn(*settings["neuron_shape"])

    def timed(neuron):
        def fwd_bwd():
            current.grad = None
            neuron(current).backward(grad)

        return median_time(fwd_bwd, settings["repeats"], settings["warmup"])

    from .neurons import enable_compiled_kernels

    enable_compiled_kernels(False)  # the eager fast path first
    result = {"shape": settings["neuron_shape"], "spikelm_s": timed(lambda x: lif_multistep(x, 0.5, 1.0)),
              "relu_s": timed(torch.relu), "spikingjelly_s": None, "ratio": None, "note": "",
              "spikelm_compiled_s": None}
    if settings.get("compile_neurons"):  # and the compiled kernels (a one-off compilation in the warm-up)
        enable_compiled_kernels(True)
        result["spikelm_compiled_s"] = timed(lambda x: lif_multistep(x, 0.5, 1.0))
    try:
        from spikingjelly.activation_based import functional, neuron, surrogate
    except ImportError:
        result["note"] = "not installed (pip install --no-deps spikingjelly loguru); row skipped"
        return result
    lif = neuron.LIFNode(tau=2.0, v_reset=None, surrogate_function=surrogate.ATan(), step_mode="m")

    def spikingjelly(x):
        functional.reset_net(lif)  # every run starts at rest, as ours does
        return lif(x)

    result["spikingjelly_s"] = timed(spikingjelly)
    result["ratio"] = result["spikelm_s"] / result["spikingjelly_s"]
    if result["spikelm_compiled_s"] is not None:
        result["compiled_ratio"] = result["spikelm_compiled_s"] / result["spikingjelly_s"]
    result["note"] = "SpikingJelly LIFNode(tau=2, v_reset=None, ATan, step_mode='m') (its torch code)"
    return result


def energy_per_token(name, model, settings):
    import torch

    from .energy import energy_report

    ids = torch.randint(settings["vocab_size"], (1, settings["energy_context"]))
    report = energy_report(model, ids)
    return {"name": name, **{key: report[key] for key in ("pj_per_token", "ann_pj_per_token", "energy_ratio",
                                                         "firing_rate", "ac_per_token", "mac_per_token")}}


def machine_info():
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def ratios(report):
    """The headline comparisons, from the rows."""
    training = {r["name"]: r["tokens_per_s"] for r in report["training"]}
    inference = {(r["name"], r["context"]): r for r in report["inference"]}
    contexts = report["settings"]["contexts"]
    low, high = min(contexts), max(contexts)
    out = {}
    for name in training:
        tag = name.replace("spikelm T=", "spikelm_t")
        out[f"decode_time_{tag}_ctx{high}_over_ctx{low}"] = (inference[(name, high)]["decode_ms_per_token"]
                                                             / inference[(name, low)]["decode_ms_per_token"])
        if name == "gpt2":
            continue
        out[f"training_tokens_per_s_{tag}_over_gpt2"] = training[name] / training["gpt2"]
        for context in contexts:
            out[f"decode_tokens_per_s_{tag}_over_gpt2_ctx{context}"] = (
                inference[(name, context)]["decode_tokens_per_s"] / inference[("gpt2", context)]["decode_tokens_per_s"])
        energy = next(e for e in report["energy"]["models"] if e["name"] == name)
        out[f"energy_per_token_{tag}_over_gpt2"] = energy["energy_ratio"]
    out["neuron_time_over_spikingjelly"] = report["neuron"]["ratio"]
    return out


def run_benchmark(settings, log=print):
    """Run every measurement; -> the report dict (written as JSON by the command)."""
    report = {"machine": machine_info(), "settings": settings,
              "shape": {k: settings[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                 "intermediate_size", "vocab_size")},
              "inference": [], "training": []}
    from .neurons import enable_compiled_kernels

    enable_compiled_kernels(bool(settings.get("compile_neurons")))  # training and inference of spikelm
    models = build_models(settings)
    for name, model in models:
        model.eval()
        inference_speed(model, settings["contexts"][0], settings)  # warm-up: the first run pays one-off costs
        for context in settings["contexts"]:
            row = {"name": name, **inference_speed(model, context, settings)}
            report["inference"].append(row)
            log(f"{name:>14} context {context:>5}: prefill {row['prefill_tokens_per_s']:9.0f} tokens/s, decode "
                f"{row['decode_tokens_per_s']:7.1f} tokens/s, state {row['state_bytes'] / 2**20:7.2f} MiB")
    report["energy"] = {"context": settings["energy_context"],
                        "models": [energy_per_token(name, model, settings) for name, model in models[1:]]}
    for name, model in models:
        row = {"name": name, **training_speed(model, settings)}
        report["training"].append(row)
        log(f"{name:>14} training: {row['tokens_per_s']:9.0f} tokens/s")
    report["neuron"] = neuron_speed(settings)
    log(f"neuron fwd+bwd {report['neuron']['spikelm_s'] * 1000:.1f} ms, SpikingJelly "
        f"{(report['neuron']['spikingjelly_s'] or float('nan')) * 1000:.1f} ms")
    for row in report["inference"]:  # last: it changes the allocator's settings
        model = dict(models)[row["name"]]
        row["peak_rss_growth_bytes"] = memory_growth(model, row["context"], settings)
        log(f"{row['name']:>14} context {row['context']:>5}: peak RSS growth "
            f"{(row['peak_rss_growth_bytes'] or 0) / 2**20:7.1f} MiB")
    report["ratios"] = ratios(report)
    return report
