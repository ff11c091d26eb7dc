"""Accuracy against energy: train the same spikelm model at several firing-rate targets and plot held-out bits
per byte against energy per token (operations only, and memory-inclusive), with the same-shape GPT-2's points.

    python eval/pareto_spike_rate.py --preset small --steps 300 --output runs/pareto --plot docs/pareto_spike_rate.png

Every run: the bundled corpus, one tokenizer, the same seed, block size, batch and step budget; targets penalise
every neuron population (spikelm.spike_rate.SpikeRateRegulariser). Energy: spikelm.energy_report over the first
held-out blocks (the references doing the same work). Also written: the firing rate at which spikelm's
memory-inclusive energy per token equals the int8 GPT-2's, from a straight-line fit of total energy against the
firing rate over the runs (at fp32 and at int8 prices for spikelm).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from spikelm import energy_report
from spikelm.presets import preset
from spikelm.spike_rate import SpikeRateRegulariser
from spikelm.training import TrainingOptions, build_config, gpt2_config, prepare_data, train


def _train(output, arch, preset_name, steps, tokenizer, regulariser=None):
    """One run of the library's training pipeline; -> (the data it read, its held-out metrics)."""
    options = TrainingOptions(output=str(output), max_steps=steps, eval_steps=steps, save_steps=steps,
                              logging_steps=max(steps // 10, 1))
    data = prepare_data(options, tokenizer=tokenizer, vocab_size=preset(preset_name)["vocab_size"])
    config = (gpt2_config(preset_name, data.tokenizer, options.block_size) if arch == "gpt2"
              else build_config(preset_name, data.tokenizer))
    train(config, data, options, callbacks=[regulariser] if regulariser else ())
    return data, json.loads((Path(output) / "results.json").read_text())


def _energy(model, blocks, count):
    ids = torch.tensor([blocks.held_out[i]["input_ids"] for i in range(min(count, len(blocks.held_out)))])
    return energy_report(model, ids)


def break_even_rate(points, reference_pj, key):
    """The firing rate where a straight line through (firing rate, points[key]) meets `reference_pj`."""
    rates = torch.tensor([p["firing_rate"] for p in points], dtype=torch.float64)
    values = torch.tensor([p[key] for p in points], dtype=torch.float64)
    slope = float(((rates - rates.mean()) * (values - values.mean())).sum() / ((rates - rates.mean()) ** 2).sum())
    intercept = float(values.mean()) - slope * float(rates.mean())
    rate = (reference_pj - intercept) / slope if slope else float("nan")
    return {"rate": rate, "slope_pj_per_rate": slope, "intercept_pj": intercept}


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (the minor-tick formatter)

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    gpt2 = result["gpt2"]
    for ax, key, title in ((axes[0], "compute_pj", "operations only"),
                           (axes[1], "total_pj", "operations + memory (8 KiB SRAM)")):
        points = result["spikelm"]
        ax.plot([p[key] for p in points], [p["bits_per_byte"] for p in points], "o-", color="tab:orange",
                label="spikelm fp32, firing-rate targets")
        for p in points:
            ax.annotate(f"{p['target'] or 'none'} (r={p['firing_rate']:.3f})", (p[key], p["bits_per_byte"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
        if key == "total_pj":
            ax.plot([p["int8_total_pj"] for p in points], [p["bits_per_byte"] for p in points], "s--",
                    color="tab:green", label="spikelm priced at int8")
        ax.plot([gpt2["fp32_" + key]], [gpt2["bits_per_byte"]], "k^", markersize=9, label="GPT-2 fp32")
        ax.plot([gpt2["int8_" + key]], [gpt2["bits_per_byte"]], "kv", markersize=9,
                label="GPT-2 int8 (its fp32 accuracy)")
        ax.set(xscale="log", title=title, xlabel="energy per token (pJ, log scale)")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("held-out bits per byte")
    figure.suptitle(f"{result['preset']} preset, {result['steps']} steps per run, bundled corpus")
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per run")
    parser.add_argument("--targets", default="none,0.08,0.04,0.02",
                        help="comma-separated firing-rate targets; 'none' trains without the penalty")
    parser.add_argument("--weight", type=float, default=10.0, help="the penalty's weight")
    parser.add_argument("--energy-blocks", type=int, default=8, help="held-out blocks the energy is counted on")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default="runs/pareto")
    parser.add_argument("--plot", default="docs/pareto_spike_rate.png")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    output = Path(args.output)
    started = time.time()

    # GPT-2 first: it trains the shared tokenizer
    data, metrics = _train(output / "gpt2", "gpt2", args.preset, args.steps, None)
    tokenizer = output / "gpt2"
    blocks = data.blocks
    points = []
    spikelm_report = None
    for target in args.targets.split(","):
        value = None if target == "none" else float(target)
        regulariser = SpikeRateRegulariser(value, args.weight) if value else None
        _, run_metrics = _train(output / f"spikelm-{target}", "spikelm", args.preset, args.steps, tokenizer,
                                regulariser)
        model = AutoModelForCausalLM.from_pretrained(output / f"spikelm-{target}")
        report = _energy(model, blocks, args.energy_blocks)
        spikelm_report = spikelm_report or report
        refs = report["references"]
        points.append({"target": value, "bits_per_byte": run_metrics["eval_bits_per_byte"],
                       "firing_rate": report["firing_rate"], "compute_pj": report["compute_pj_per_token"],
                       "memory_pj": report["memory_pj_per_token"], "total_pj": report["total_pj_per_token"],
                       "int8_total_pj": report["by_precision"]["int8"]["total_pj"],
                       "ac": report["ac_per_token"], "mac": report["mac_per_token"],
                       "weight_reads": report["weight_reads_per_token"]})
        print(json.dumps(points[-1]))
        output.joinpath("points.jsonl").open("a").write(json.dumps(points[-1]) + "\n")  # survives a later failure
    refs = spikelm_report["references"]  # the references do not depend on the spikes: the same for every run
    gpt2 = {"bits_per_byte": metrics["eval_bits_per_byte"],
            "fp32_compute_pj": refs["gpt2_fp32"]["compute_pj"], "fp32_total_pj": refs["gpt2_fp32"]["total_pj"],
            "int8_compute_pj": refs["gpt2_int8"]["compute_pj"], "int8_total_pj": refs["gpt2_int8"]["total_pj"],
            "mac": refs["gpt2_fp32"]["mac"], "ac": refs["gpt2_fp32"]["ac"]}
    result = {
        "command": "python eval/pareto_spike_rate.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "preset": args.preset, "steps": args.steps, "weight": args.weight, "energy_blocks": args.energy_blocks,
        "spikelm": points, "gpt2": gpt2, "ann_twin": refs["ann_twin"],
        "break_even_with_gpt2_int8": {
            "spikelm_fp32": break_even_rate(points, gpt2["int8_total_pj"], "total_pj"),
            "spikelm_int8": break_even_rate(points, gpt2["int8_total_pj"], "int8_total_pj")},
        "seconds": time.time() - started, "torch_threads": torch.get_num_threads(),
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "pareto.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.plot)
    even = result["break_even_with_gpt2_int8"]
    for name, fit in even.items():
        if fit["rate"] < 0:  # even silent, the run's fixed costs (membranes, attention state) exceed the reference
            fit["note"] = (f"none: at firing rate 0 the fitted line gives {fit['intercept_pj']:,.0f} pJ/token, above "
                           f"the int8 GPT-2's {gpt2['int8_total_pj']:,.0f}")
    (output / "pareto.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"GPT-2: {gpt2['bits_per_byte']:.3f} bits/byte, fp32 {gpt2['fp32_total_pj']:,.0f} pJ/token, int8 "
          f"{gpt2['int8_total_pj']:,.0f} pJ/token (memory included); spikelm meets the int8 GPT-2 at firing rate "
          f"{even['spikelm_fp32']['rate']:.4f} (fp32 prices) / {even['spikelm_int8']['rate']:.4f} (int8 prices); "
          f"wrote {output / 'pareto.json'} and {args.plot} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
