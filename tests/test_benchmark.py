"""spikelm bench: the quick run writes every field; the memory probe sees an allocation it is shown.
(How long the quick run takes is the benchmark's own figure, not a unit test's: no test here asserts a time.)"""

import json
import math
import statistics
import time

import torch

from spikelm import allocator
from spikelm.benchmark import QUICK, PeakRSS
from spikelm.cli import build_parser, main
from spikelm.cli.bench import command_line, settings_from_args
from spikelm.reporting import results_page

TRAINING = {"name", "tokens_per_s", "step_s", "tokens_per_s_rounds"}
INFERENCE = {"name", "context", "prefill_tokens_per_s", "prefill_s", "decode_tokens_per_s", "decode_ms_per_token",
             "state_bytes", "peak_rss_growth_bytes", "decode_tokens_per_s_rounds",
             "decode_after_prefill_tokens_per_s_rounds"}
NEURON = {"shape", "spikelm_s", "relu_s", "spikingjelly_s", "ratio", "note", "spikelm_compiled_s"}
ENERGY = {"name", "pj_per_token", "ann_pj_per_token", "energy_ratio", "firing_rate", "ac_per_token", "mac_per_token"}


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_peak_rss_sees_a_64_mib_tensor():
    with PeakRSS() as memory:
        block = torch.ones(16 * 2**20)  # 64 MiB, written so that its pages are resident
        time.sleep(0.05)  # held for many of the sampler's 1 ms ticks (a busy machine can delay one by ms)
        del block
    assert memory.growth is not None and 60 * 2**20 < memory.growth < 200 * 2**20


def test_the_allocator_flag_reaches_the_settings_and_the_recorded_command():
    args = build_parser(only="bench").parse_args(["bench", "--quick", "--no-keep-freed-memory"])
    assert settings_from_args(args)["keep_freed_memory"] is False
    assert command_line(args) == "spikelm bench --quick --attention-type ssa --no-keep-freed-memory"
    args = build_parser(only="bench").parse_args(["bench", "--quick"])
    assert settings_from_args(args)["keep_freed_memory"] is True and "memory" not in command_line(args)


def test_quick_bench_writes_every_field(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--threads", "1", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"machine", "settings", "shape", "inference", "training", "energy", "neuron", "ratios",
                           "command", "event_driven", "training_allocator"}
    assert report["command"] == "spikelm bench --quick --attention-type ssa --threads 1"
    # both models train with freed memory kept for reuse, where glibc's allocator can be told to
    kept = allocator.libc() is not None
    assert report["training_allocator"].startswith("glibc: freed memory kept" if kept else "as the process found it")
    assert report["machine"]["torch_threads"] == 1
    assert {"cpu", "cpu_count", "torch", "transformers", "python", "date"} <= set(report["machine"])
    settings = report["settings"]
    assert settings["contexts"] == QUICK["contexts"] and settings["hidden_size"] == QUICK["hidden_size"]
    names = ["gpt2"] + [f"spikelm T={t}" for t in settings["time_steps"]]

    assert [row["name"] for row in report["training"]] == names
    for row in report["training"]:
        assert set(row) == TRAINING and positive(row["tokens_per_s"]) and positive(row["step_s"])
        assert len(row["tokens_per_s_rounds"]) == QUICK["rounds"] and row["tokens_per_s"] in row["tokens_per_s_rounds"]

    rows = {(row["name"], row["context"]): row for row in report["inference"]}
    assert set(rows) == {(name, c) for name in names for c in settings["contexts"]}
    decoded = settings["warmup"] + settings["decode_tokens"]
    for (name, context), row in rows.items():
        assert set(row) == INFERENCE
        assert all(positive(row[k]) for k in INFERENCE - {"name", "context", "peak_rss_growth_bytes",
                                                          "decode_tokens_per_s_rounds",
                                                          "decode_after_prefill_tokens_per_s_rounds"})
        # the table's decode rate: the median of the passes timed close together (paired_decode)
        assert len(row["decode_tokens_per_s_rounds"]) == QUICK["decode_passes"]
        assert row["decode_tokens_per_s"] == statistics.median(row["decode_tokens_per_s_rounds"])
        assert len(row["decode_after_prefill_tokens_per_s_rounds"]) == QUICK["rounds"]
        assert row["peak_rss_growth_bytes"] is not None and row["peak_rss_growth_bytes"] >= 0
        if name == "gpt2":  # keys and values: 2 x layers x tokens x D float32 numbers
            tokens = context + decoded
            assert row["state_bytes"] == 2 * settings["num_hidden_layers"] * tokens * settings["hidden_size"] * 4
    for name in names[1:]:  # spikelm's state does not grow with the context
        assert len({rows[(name, c)]["state_bytes"] for c in settings["contexts"]}) == 1

    assert set(report["neuron"]) == NEURON and positive(report["neuron"]["spikelm_s"])
    assert report["neuron"]["spikelm_compiled_s"] is None  # compiled kernels only with --compile-neurons
    try:
        import spikingjelly  # noqa: F401
        assert positive(report["neuron"]["spikingjelly_s"]) and positive(report["neuron"]["ratio"])
    except ImportError:
        assert report["neuron"]["spikingjelly_s"] is None and "not installed" in report["neuron"]["note"]

    assert report["energy"]["context"] == QUICK["energy_context"]
    for row in report["energy"]["models"]:
        assert set(row) == ENERGY and 0 < row["energy_ratio"] < 10 and 0 < row["firing_rate"] < 1

    low, high = min(settings["contexts"]), max(settings["contexts"])
    expected = {"neuron_time_over_spikingjelly", f"decode_time_gpt2_ctx{high}_over_ctx{low}"}
    for t in settings["time_steps"]:
        expected |= {f"decode_time_spikelm_t{t}_ctx{high}_over_ctx{low}", f"training_tokens_per_s_spikelm_t{t}_over_gpt2",
                     f"energy_per_token_spikelm_t{t}_over_gpt2"}
        expected |= {f"decode_tokens_per_s_spikelm_t{t}_over_gpt2_ctx{c}" for c in settings["contexts"]}
    expected |= {"event_driven_over_dense_decode_tokens_per_s", "event_driven_same_tokens_as_dense"}
    assert set(report["ratios"]) == expected
    for t in settings["time_steps"]:  # each decode ratio: the median of the same pass's ratios
        mine, gpt2 = rows[(f"spikelm T={t}", low)], rows[("gpt2", low)]
        assert report["ratios"][f"decode_tokens_per_s_spikelm_t{t}_over_gpt2_ctx{low}"] == statistics.median(
            a / b for a, b in zip(mine["decode_tokens_per_s_rounds"], gpt2["decode_tokens_per_s_rounds"]))
        assert report["ratios"][f"decode_time_spikelm_t{t}_ctx{high}_over_ctx{low}"] == statistics.median(
            a / b for a, b in zip(mine["decode_tokens_per_s_rounds"],
                                  rows[(f"spikelm T={t}", high)]["decode_tokens_per_s_rounds"]))
    event = report["event_driven"]  # dense against event-driven decode, and the measured crossover
    assert event["shape"] == QUICK["event_shape"] and positive(event["event_over_dense"])
    assert all(positive(event[f"{name}_decode_tokens_per_s"]) for name in ("dense", "event_driven", "dense_again"))
    assert len(event["dense_tokens"]) == decoded + 1 and 0 < event["firing_rate"] < 1
    assert event["same_tokens"] == (event["dense_tokens"] == event["event_driven_tokens"])
    assert len({row["in"] for row in event["crossover"]["rows"]}) >= 2
    assert all(positive(row[key]) for row in event["crossover"]["rows"]
               for key in ("dense_us", "kernel_us", "compacted_us", "gather_us", "active"))
    markdown = out.with_suffix(".md").read_text()
    assert "| spikelm T=4 | 512 |" in markdown and "SpikingJelly" in markdown
    page = results_page(bench=report)  # docs/results.md is rendered from the JSON alone
    assert page.startswith("# Results") and "| gpt2 | 128 |" in page and report["command"] in page
