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

import datetime
import gc
import os
import platform
import statistics
import threading
import time
from pathlib import Path

from . import allocator


FULL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, vocab_size=4096,
            time_steps=[4], contexts=[128, 512, 2048, 4096], train_batch=8, train_seq_len=256, decode_tokens=32,
            repeats=5, warmup=1, rounds=3, decode_passes=7, neuron_shape=[4, 2048, 1024], energy_context=512,
            event_shape=dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16),
            crossover_shapes=[(256, 1024), (1024, 256), (1024, 4096), (4096, 1024)])
QUICK = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, vocab_size=512,
             time_steps=[4], contexts=[128, 512], train_batch=4, train_seq_len=64, decode_tokens=8, repeats=3,
             warmup=1, rounds=1, decode_passes=2, neuron_shape=[4, 512, 1024], energy_context=128,
             event_shape=dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4),
             crossover_shapes=[(256, 1024), (1024, 256)])

# PeakRSS pins glibc's mmap threshold this low while it measures (see spikelm.allocator)
MMAP_THRESHOLD_MEMORY = 64 * 2**10


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


class PeakRSS:
    """Peak growth of the resident set size during a block, sampled every millisecond by a thread.

    Freed memory that the allocator keeps would hide the growth of a later run, so during the block
    glibc's mmap threshold is pinned at 64 KiB: every tensor of 64 KiB or more gets its own mapping, which
    goes back to the system when the tensor is freed. `growth` is None where this cannot be done (no
    glibc, or no /proc): there the figure would not be reliable.
    """

    def __init__(self):
        self.libc = allocator.libc()
        self.growth = None

    @staticmethod
    def rss():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.libc is None:
            return self
        gc.collect()
        self.libc.mallopt(allocator.M_MMAP_THRESHOLD, MMAP_THRESHOLD_MEMORY)
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
        allocator.steady_state()


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
    ids = torch.randint(settings["vocab_size"], (batch, seq_len), device=settings.get("device", "cpu"))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(ids.device)

    seconds = median_time(step, settings["repeats"], settings["warmup"])
    model.eval()
    return {"tokens_per_s": batch * seq_len / seconds, "step_s": seconds}


class StepClock:
    """A logits processor that changes nothing and notes the time of each generation step: the intervals
    between its calls are whole decode steps of plain `generate()` (forward, sampling, bookkeeping)."""

    def __init__(self, device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        _synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def _synchronize(device):
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def generate_decode_s(model, prompt, settings, cache=None):
    """Median seconds per decode step of plain `model.generate()` (greedy, batch 1) after `prompt`, over
    `decode_tokens` steps after `warmup` steps. `cache`: the state after all but the last prompt token (generate
    then runs that token and decodes, without prefilling the prompt again); it is used up."""
    from transformers import LogitsProcessorList

    new_tokens = settings["warmup"] + settings["decode_tokens"] + 1
    clock = StepClock(prompt.device)
    extra = {} if cache is None else {"cache": cache}
    output = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=0, logits_processor=LogitsProcessorList([clock]),
                            return_dict_in_generate=True, **extra)
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])][settings["warmup"]:]
    return statistics.median(steps), output


def inference_speed(model, context, settings):
    """Prefill `context` random tokens (median of repeats); then decode greedily `decode_tokens` tokens through
    plain `model.generate()` (what users call), each step timed (median)."""
    import torch

    device = settings.get("device", "cpu")
    prompt = torch.randint(settings["vocab_size"], (1, context), device=device)

    def prefill():
        output = model(prompt, use_cache=True)
        _synchronize(device)
        return output

    with torch.no_grad():
        prefill_s = median_time(prefill, settings["repeats"], settings["warmup"])
        decode_s, output = generate_decode_s(model, prompt, settings)
        cache = output.cache  # the state after warmup + decode tokens
    return {"context": context, "prefill_tokens_per_s": context / prefill_s, "prefill_s": prefill_s,
            "decode_tokens_per_s": 1.0 / decode_s, "decode_ms_per_token": 1000.0 * decode_s,
            "state_bytes": state_bytes(cache)}


def paired_decode(timed, contexts, settings, pairs):
    """Decode rates timed close together, for the ratios: every model's state after every context is made once
    (a forward over all but the last prompt token, untimed); then `pairs` times, through each context in turn,
    each model decodes from a copy of its state through plain `generate()`. In each pass the models' rates at
    one context, and a model's rates at every context, are timed within a second or two of each other, so a
    machine whose speed drifts over tens of seconds (a shared VM) drifts out of their ratios; timed after a
    fresh prefill each (`inference_speed`), the contexts' decodes were a minute apart.
    -> {(name, context): [tokens/s, one per pass]}"""
    import copy

    import torch

    device = settings.get("device", "cpu")
    states = {}
    with torch.no_grad():
        for context in contexts:
            prompt = torch.randint(settings["vocab_size"], (1, context), device=device)
            for name, model in timed:
                states[(name, context)] = (prompt, model(prompt[:, :-1], use_cache=True).cache)
        rates = {}
        for _ in range(pairs):
            for context in contexts:
                for name, model in timed:
                    prompt, cache = states[(name, context)]
                    seconds, _ = generate_decode_s(model, prompt, settings, cache=copy.deepcopy(cache))
                    rates.setdefault((name, context), []).append(1.0 / seconds)
    return rates


def event_driven_speed(settings, log=print):
    """Dense against event-driven decode of one spikelm model at a width whose weights do not fit in cache
    (`event_shape`: D=1024, 8 layers by default), through plain generate() at the first context: tokens/s of
    each, whether they chose the same tokens, the firing rate; and the dense/compacted crossover."""
    import torch

    from . import SpikeLMConfig, SpikeLMForCausalLM, energy_report
    from .event_driven import CROSSOVER_SHAPES, crossover, set_event_driven

    shape = settings["event_shape"]
    torch.manual_seed(0)
    config = SpikeLMConfig(vocab_size=settings["vocab_size"], hidden_size=shape["hidden_size"],
                           num_hidden_layers=shape["num_hidden_layers"],
                           num_attention_heads=shape["num_attention_heads"],
                           intermediate_size=4 * shape["hidden_size"], time_steps=settings["time_steps"][0],
                           attention_type=settings["attention_type"])
    device = settings.get("device", "cpu")
    model = SpikeLMForCausalLM(config).to(device).eval()
    context = settings["contexts"][0]
    prompt = torch.randint(settings["vocab_size"], (1, context), device=device)
    result = {"shape": shape, "context": context}
    with torch.no_grad():
        for name, enabled in (("dense", False), ("event_driven", True), ("dense_again", False)):
            set_event_driven(model, enabled)
            seconds, output = generate_decode_s(model, prompt, settings)
            result[f"{name}_decode_tokens_per_s"] = 1.0 / seconds
            result[f"{name}_tokens"] = output.sequences[0, context:].tolist()
    set_event_driven(model, True)
    result["same_tokens"] = result["dense_tokens"] == result["event_driven_tokens"]
    result["firing_rate"] = energy_report(model, prompt.cpu() if device == "cpu" else prompt)["firing_rate"]
    dense = (result["dense_decode_tokens_per_s"] + result["dense_again_decode_tokens_per_s"]) / 2
    result["event_over_dense"] = result["event_driven_decode_tokens_per_s"] / dense
    log(f"event-driven decode at D={shape['hidden_size']}, {shape['num_hidden_layers']} layers: "
        f"{result['event_driven_decode_tokens_per_s']:.1f} tokens/s against dense {dense:.1f} "
        f"({result['event_over_dense']:.2f}x), same tokens: {result['same_tokens']}, "
        f"firing rate {result['firing_rate']:.3f}")
    if device == "cpu":
        result["crossover"] = crossover(settings.get("crossover_shapes", CROSSOVER_SHAPES),
                                        time_steps=settings["time_steps"][0])
        log(f"C spike matmul faster than dense (weights read from memory) up to firing rates "
            f"{result['crossover']['kernel_highest_rate_faster']}")
    return result


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

    device = settings.get("device", "cpu")
    current = torch.randn(*settings["neuron_shape"], device=device).requires_grad_()
    grad = torch.randn(*settings["neuron_shape"], device=device)

    def timed(neuron):
        def fwd_bwd():
            current.grad = None
            neuron(current).backward(grad)
            _synchronize(device)

        return median_time(fwd_bwd, settings["repeats"], settings["warmup"])

    from .neurons import enable_compiled_kernels

    enable_compiled_kernels(False)  # the eager fast path first
    result = {"shape": settings["neuron_shape"], "spikelm_s": timed(lambda x: lif_multistep(x, 0.5, 1.0)),
              "relu_s": timed(torch.relu), "spikingjelly_s": None, "ratio": None, "note": "",
              "spikelm_compiled_s": None}
    if settings.get("compile_neurons"):  # and the compiled kernels (a one-off compilation in the warm-up)
        enable_compiled_kernels(True)
        result["spikelm_compiled_s"] = timed(lambda x: lif_multistep(x, 0.5, 1.0))
    enable_compiled_kernels(None)  # back to the default
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

    ids = torch.randint(settings["vocab_size"], (1, settings["energy_context"]), device=settings.get("device", "cpu"))
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


def _rate_ratio(row, other, key="decode_tokens_per_s"):
    """`key` (a rate) of `row` over `other`: the median of the same rounds' ratios where both were timed in
    rounds, else the ratio of their medians."""
    rounds = list(zip(row.get(f"{key}_rounds", []), other.get(f"{key}_rounds", [])))
    if rounds:
        return statistics.median(mine / theirs for mine, theirs in rounds)
    return row[key] / other[key]


def ratios(report):
    """The headline comparisons, from the rows."""
    training = {r["name"]: r for r in report["training"]}
    inference = {(r["name"], r["context"]): r for r in report["inference"]}
    contexts = report["settings"]["contexts"]
    low, high = min(contexts), max(contexts)
    out = {}
    # every model timed (compiled decode rows too); training and energy only for the models that have them
    for name in dict.fromkeys(r["name"] for r in report["inference"]):
        tag = name.replace("spikelm T=", "spikelm_t").replace(" ", "_")
        # time at the longest context over the shortest: the shortest's rate over the longest's
        out[f"decode_time_{tag}_ctx{high}_over_ctx{low}"] = _rate_ratio(inference[(name, low)],
                                                                        inference[(name, high)])
        if name == "gpt2":
            continue
        if name in training:
            out[f"training_tokens_per_s_{tag}_over_gpt2"] = _rate_ratio(training[name], training["gpt2"],
                                                                        "tokens_per_s")
        for context in contexts:
            out[f"decode_tokens_per_s_{tag}_over_gpt2_ctx{context}"] = _rate_ratio(inference[(name, context)],
                                                                                   inference[("gpt2", context)])
        energy = next((e for e in report["energy"]["models"] if e["name"] == name), None)
        if energy is not None:
            out[f"energy_per_token_{tag}_over_gpt2"] = energy["energy_ratio"]
    out["neuron_time_over_spikingjelly"] = report["neuron"]["ratio"]
    if "event_driven" in report:
        out["event_driven_over_dense_decode_tokens_per_s"] = report["event_driven"]["event_over_dense"]
        out["event_driven_same_tokens_as_dense"] = report["event_driven"]["same_tokens"]
    return out


def run_benchmark(settings, log=print):
    """Run every measurement; -> the report dict (written as JSON by the command)."""
    report = {"machine": machine_info(), "settings": settings,
              "shape": {k: settings[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                 "intermediate_size", "vocab_size")},
              "inference": [], "training": []}
    from .neurons import enable_compiled_kernels

    # spikelm as users get it: compiled neuron kernels where they pay (or everywhere with --compile-neurons)
    enable_compiled_kernels(True if settings.get("compile_neurons") else None)
    device = settings.get("device", "cpu")
    models = [(name, model.to(device)) for name, model in build_models(settings)]
    timed = list(models)
    if settings.get("compile_decode"):  # each spikelm model again, its decode step compiled (compile_decode)
        import copy

        timed += [(f"{name} compiled", copy.deepcopy(model).compile_decode()) for name, model in models
                  if name != "gpt2"]
    for name, model in timed:
        model.eval()
        inference_speed(model, settings["contexts"][0], settings)  # warm-up: one-off costs, compilation
    # `rounds` rounds, each through every context, the models taking turns at each (prefill, state, and a decode
    # after each prefill); then the decode passes, from which the decode ratios are taken: each the median of the
    # same pass's ratios (between models at one context, and between one model's contexts).
    rows = {}
    for _ in range(settings.get("rounds", 1)):
        for context in settings["contexts"]:
            for name, model in timed:
                rows.setdefault((name, context), []).append(inference_speed(model, context, settings))
    # the decode rates of the table and the ratios: timed in passes close together (paired_decode)
    paired = paired_decode(timed, settings["contexts"], settings, settings.get("decode_passes", 5))
    for name, _ in timed:
        for context in settings["contexts"]:
            runs = rows[(name, context)]
            row = {"name": name, "context": context, "state_bytes": runs[0]["state_bytes"]}
            for key in ("prefill_tokens_per_s", "prefill_s"):
                row[key] = statistics.median(run[key] for run in runs)
            row["decode_tokens_per_s_rounds"] = paired[(name, context)]
            row["decode_tokens_per_s"] = statistics.median(row["decode_tokens_per_s_rounds"])
            row["decode_ms_per_token"] = 1000.0 / row["decode_tokens_per_s"]
            # each round's decode after its own prefill, as timed before passes (for comparison)
            row["decode_after_prefill_tokens_per_s_rounds"] = [run["decode_tokens_per_s"] for run in runs]
            if name.endswith(" compiled"):
                row["peak_rss_growth_bytes"] = None  # the same state and memory as its model
            report["inference"].append(row)
            log(f"{name:>14} context {context:>5}: prefill {row['prefill_tokens_per_s']:9.0f} tokens/s, decode "
                f"{row['decode_tokens_per_s']:7.1f} tokens/s (passes: "
                f"{', '.join(f'{r:.0f}' for r in row['decode_tokens_per_s_rounds'])}), "
                f"state {row['state_bytes'] / 2**20:7.2f} MiB")
    del timed
    report["event_driven"] = event_driven_speed(settings, log)
    report["energy"] = {"context": settings["energy_context"],
                        "models": [energy_per_token(name, model, settings) for name, model in models[1:]]}
    # training in rounds too, the models taking turns: the ratio is the median of the rounds' ratios. On the
    # CPU both models train with freed memory kept for reuse, as `spikelm train` does (spikelm.allocator)
    kept = settings.get("keep_freed_memory", True) and device == "cpu"
    report["training_allocator"] = (allocator.keep_freed_memory() if kept else None) or "as the process found it"
    log(f"training with the allocator: {report['training_allocator']}")
    trained = {}
    for _ in range(settings.get("rounds", 1)):
        for name, model in models:
            trained.setdefault(name, []).append(training_speed(model, settings))
    if kept:
        allocator.steady_state()  # the rest (neurons, memory) as a long-running process settles by itself
    for name, _ in models:
        runs = trained[name]
        row = {"name": name, "tokens_per_s": statistics.median(run["tokens_per_s"] for run in runs),
               "step_s": statistics.median(run["step_s"] for run in runs),
               "tokens_per_s_rounds": [run["tokens_per_s"] for run in runs]}
        report["training"].append(row)
        log(f"{name:>14} training: {row['tokens_per_s']:9.0f} tokens/s (rounds: "
            f"{', '.join(f'{r:.0f}' for r in row['tokens_per_s_rounds'])})")
    report["neuron"] = neuron_speed(settings)
    log(f"neuron fwd+bwd {report['neuron']['spikelm_s'] * 1000:.1f} ms, SpikingJelly "
        f"{(report['neuron']['spikingjelly_s'] or float('nan')) * 1000:.1f} ms")
    for row in report["inference"] if device == "cpu" else []:  # last: it changes the allocator's settings
        if row["name"] not in dict(models):  # a compiled twin: the same state and memory as its model
            continue
        model = dict(models)[row["name"]]
        row["peak_rss_growth_bytes"] = memory_growth(model, row["context"], settings)
        log(f"{row['name']:>14} context {row['context']:>5}: peak RSS growth "
            f"{(row['peak_rss_growth_bytes'] or 0) / 2**20:7.1f} MiB")
    report["ratios"] = ratios(report)
    return report
