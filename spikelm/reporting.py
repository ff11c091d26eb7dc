"""Markdown tables and plots made from the JSON that `spikelm eval` and `spikelm bench` write.

Pure functions of the JSON dicts: the numbers are measured once, and the pages (docs/results.md) are
rendered from the files, so a page can be remade without measuring again.
"""

import math
from pathlib import Path


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _n(x, digits=3, rounding=round):
    """A number for a table: integers with thousands separators, small ones with `digits` significant digits.
    `rounding`: round (to nearest), math.ceil or math.floor, applied at the last digit shown."""
    if x is None:
        return "n/a"
    if abs(x) >= 1000:
        return f"{rounding(x):,.0f}"
    if x == 0 or rounding is round:
        return f"{x:.{digits}g}"
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(abs(x))))
    shown = rounding(round(x * scale, 6)) / scale  # round(, 6): 0.14 * 1000 is not always 140 in binary
    return f"{shown:,.0f}" if abs(shown) >= 1000 else f"{shown:.{digits}g}"


# Energy figures are shown rounded against spikelm, never in its favour: its own costs up, the references'
# down, and the ratios spikelm over a reference (below 1: spikelm spends less) up.
def _up(x, digits=3):
    return _n(x, digits, math.ceil)


def _down(x, digits=3):
    return _n(x, digits, math.floor)


def _ratio(x, decimals=3):
    return f"{math.ceil(round(x * 10 ** decimals, 6)) / 10 ** decimals:.{decimals}f}"


def _bytes(n):
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


# ================================================================ energy


def energy_markdown(report):
    """The energy report as Markdown: spikelm against each reference (operations, memory traffic, compute,
    memory and total pJ per token), spikelm at each precision, then one row per layer and kind (per token)."""
    config = report["config"]
    prices = report["prices"]
    refs = report["references"]
    models = [("spikelm", {"ac": report["ac_per_token"], "mac": report["mac_per_token"],
                           "weight_reads": report["weight_reads_per_token"],
                           "state_reads": report["state_reads_per_token"],
                           "state_writes": report["state_writes_per_token"],
                           "spike_reads": report["spike_reads_per_token"],
                           "compute_pj": report["compute_pj_per_token"], "memory_pj": report["memory_pj_per_token"],
                           "total_pj": report["total_pj_per_token"], "precision": report["precision"]})]
    models += [(ref["label"], ref) for ref in refs.values()]
    spikelm_total = report["total_pj_per_token"]
    spikelm_compute = report["compute_pj_per_token"]
    lines = [
        f"Energy per token of spikelm (D={config['hidden_size']}, {config['num_hidden_layers']} layers, "
        f"{config['num_attention_heads']} heads, T={config['time_steps']}, {config['attention_type']}, "
        f"vocabulary {config['vocab_size']}) over {report['tokens']} tokens, at {report['precision']}: "
        f"E_AC = {report['e_ac_pj']} pJ, E_MAC = {report['e_mac_pj']} pJ; memory {prices['read_pj_per_64_bits']} pJ "
        f"per 64 bits read, {prices['write_pj_per_64_bits']} pJ written (an 8 KiB SRAM, Horowitz 2014). "
        f"Firing rate {report['firing_rate']:.4f}, {_n(report['spikes_per_token'])} spikes per token. "
        "Figures per token: counts, and energy in pJ per token. Ratios: spikelm over the model (below 1: spikelm "
        "spends less).",
        "",
        _table(["model", "precision", "ACs", "MACs", "weight reads", "state reads", "state writes", "compute pJ",
                "memory pJ", "total pJ", "spikelm/model compute", "spikelm/model total"],
               [[name, m["precision"]] + [(_up if name == "spikelm" else _down)(m[key]) for key in
                                          ("ac", "mac", "weight_reads", "state_reads", "state_writes", "compute_pj",
                                           "memory_pj", "total_pj")] +
                [_ratio(spikelm_compute / m["compute_pj"]), _ratio(spikelm_total / m["total_pj"])]
                for name, m in models]),
        "",
        "spikelm at each precision (weights, membranes and attention state at its bits; spikes 1 bit):",
        "",
        _table(["precision", "compute pJ", "memory pJ", "total pJ", "vs GPT-2 fp32 total", "vs GPT-2 int8 total"],
               [[p, _up(f["compute_pj"]), _up(f["memory_pj"]), _up(f["total_pj"]),
                 _ratio(f["total_pj"] / refs["gpt2_fp32"]["total_pj"]),
                 _ratio(f["total_pj"] / refs["gpt2_int8"]["total_pj"])] for p, f in report["by_precision"].items()]),
        "",
        "Per layer (per token; GPT-2 pJ: the fp32 GPT-2's operations):",
        "",
        _table(["layer", "firing rate", "spikes", "ACs", "MACs", "compute pJ", "memory pJ", "GPT-2 pJ"],
               [[layer, f"{rate:.4f}", _n(report.get("spikes_per_token_per_layer", {}).get(layer)),
                 _up(sum(r["ac"] for r in report["rows"] if r["layer"] == layer)),
                 _up(sum(r["mac"] for r in report["rows"] if r["layer"] == layer)),
                 _up(sum(r["pj"] for r in report["rows"] if r["layer"] == layer)),
                 _up(sum(r["memory_pj"] for r in report["rows"] if r["layer"] == layer)),
                 _down(report.get("ann_per_layer", {}).get(layer, {}).get("pj"))]
                for layer, rate in report["firing_rate_per_layer"].items()]),
        "",
        "By layer and kind (per token):",
        "",
        _table(["layer", "kind", "ACs", "MACs", "compute pJ", "memory pJ"],
               [[row["layer"], row["kind"], _up(row["ac"]), _up(row["mac"]), _up(row["pj"]), _up(row["memory_pj"])]
                for row in report["rows"]]),
    ]
    return "\n".join(lines) + "\n"


def energy_summary_lines(report):
    """Two lines for a terminal: spikelm's operation energy with its counts, then memory-inclusive figures of
    spikelm and each reference (compute + memory = total pJ per token, with the operation counts)."""
    up, down = math.ceil, math.floor  # rounded against spikelm (see _up)
    first = (f"energy: {up(report['pj_per_token'])} pJ/token ({up(report['ac_per_token'])} ACs + "
             f"{up(report['mac_per_token'])} MACs per token, firing rate {report['firing_rate']:.3f}); "
             f"same-shape GPT-2: {down(report['ann_pj_per_token'])} pJ/token (x{_ratio(report['energy_ratio'])})")
    parts = [f"spikelm {report['precision']} {up(report['compute_pj_per_token'])} + "
             f"{up(report['memory_pj_per_token'])} = {up(report['total_pj_per_token'])}"]
    parts += [f"{ref['label'].split(' (')[0]}{'' if ref['label'].endswith(ref['precision']) else ' ' + ref['precision']} "
              f"{down(ref['compute_pj'])} + {down(ref['memory_pj'])} = {down(ref['total_pj'])} "
              f"({down(ref['ac'])} ACs + {down(ref['mac'])} MACs)" for ref in report["references"].values()]
    second = "with memory (operations + memory = total pJ/token): " + "; ".join(parts)
    return first + "\n" + second


def _layer_energy(report):
    """pJ per token by layer and kind: {kind: [pJ for each layer in order]}, and the layer labels."""
    layers = list(report["firing_rate_per_layer"])
    by_kind = {}
    for row in report["rows"]:
        by_kind.setdefault(row["kind"], [0.0] * len(layers))[layers.index(row["layer"])] += row["pj"]
    return layers, by_kind


def plot_energy(report, path):
    """Three panels: firing rate per layer; operation energy per token per layer stacked by kind, with the
    fp32 GPT-2's per-layer energy as markers; and compute + memory energy per token of spikelm and each
    reference."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    layers, by_kind = _layer_energy(report)
    x = range(len(layers))
    figure, (rates, energy, totals) = plt.subplots(1, 3, figsize=(16, 4.5))
    rates.bar(x, [report["firing_rate_per_layer"][layer] for layer in layers], color="tab:orange")
    rates.set(title="firing rate per layer", ylabel="spikes per neuron and step", xticks=list(x))
    rates.set_xticklabels(layers, rotation=30)
    bottom = [0.0] * len(layers)
    for kind, values in by_kind.items():
        energy.bar(x, values, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, values)]
    if "ann_per_layer" in report:
        energy.plot(list(x), [report["ann_per_layer"][layer]["pj"] for layer in layers], "k_", markersize=30,
                    markeredgewidth=2, linestyle="none", label="same-shape GPT-2")
    energy.set(title=f"operation energy per token (x{_ratio(report['energy_ratio'])} of GPT-2 in all)",
               ylabel="pJ per token", xticks=list(x))
    energy.set_xticklabels(layers, rotation=30)
    top = max(bottom + [report.get("ann_per_layer", {}).get(layer, {}).get("pj", 0) for layer in layers])
    energy.set_ylim(0, 1.3 * top)  # room for the legend above the bars
    energy.legend(fontsize=8, ncol=3, loc="upper center")
    names = [f"spikelm {p}" for p in report["by_precision"]] + [r["label"].replace(" (", "\n(")
                                                                for r in report["references"].values()]
    figures = list(report["by_precision"].values()) + list(report["references"].values())
    y = range(len(names))
    totals.barh(y, [f["compute_pj"] for f in figures], color="tab:blue", label="operations")
    totals.barh(y, [f["memory_pj"] for f in figures], left=[f["compute_pj"] for f in figures], color="tab:gray",
                label="memory (SRAM)")
    totals.set(title="energy per token: operations + memory", xlabel="pJ per token", yticks=list(y))
    totals.set_yticklabels(names, fontsize=7)
    totals.invert_yaxis()
    totals.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


# ================================================================ perplexity


def perplexity_markdown(results):
    """results: a list of `spikelm eval perplexity --json` dicts (one per model)."""
    rows = [[Path(r.get("model", "?")).name, r["model_type"], r["mode"], f"{r['perplexity']:.3f}",
             f"{r['bits_per_byte']:.4f}", r["predicted_tokens"], r["text_bytes"]] for r in results]
    return _table(["model", "type", "evaluation", "perplexity", "bits per byte", "tokens", "bytes"], rows) + "\n"


# ================================================================ benchmark


def benchmark_markdown(report):
    shape = report["shape"]
    machine = report["machine"]
    lines = [
        f"Same shape: D={shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
        f"{shape['num_attention_heads']} heads, MLP {shape['intermediate_size']}, vocabulary {shape['vocab_size']}; "
        f"random weights, {report['settings']['dtype']}. {machine['cpu']} ({machine['cpu_count']} cores, "
        f"{machine['torch_threads']} torch threads), torch {machine['torch']}, transformers "
        f"{machine['transformers']}, {machine['date']}. Medians of {report['settings']['repeats']} repeats.",
        "",
        "Training (forward, backward, AdamW step), batch "
        f"{report['settings']['train_batch']} x {report['settings']['train_seq_len']} tokens:",
        "",
        _table(["model", "tokens/s", "step (s)"],
               [[r["name"], _n(r["tokens_per_s"]), f"{r['step_s']:.4f}"] for r in report["training"]]),
        "",
        f"Inference, batch 1, greedy. Decode: {report['settings']['decode_tokens']} steps through `generate()` "
        f"from the state after the context, the median step; the median over "
        f"{report['settings'].get('decode_passes', 1)} passes through every context and model, timed close "
        "together (the ratios are the medians of the same pass's ratios). "
        "State: GPT-2's keys and values (DynamicCache) or spikelm's recurrent state (SpikeLMCache). "
        "Peak RSS growth: the process's resident memory above its level before the prefill, sampled during "
        "prefill and decode.",
        "",
        _table(["model", "context", "prefill tokens/s", "decode tokens/s", "decode ms/token", "state",
                "peak RSS growth"],
               [[r["name"], r["context"], _n(r["prefill_tokens_per_s"]), _n(r["decode_tokens_per_s"]),
                 f"{r['decode_ms_per_token']:.2f}", _bytes(r["state_bytes"]), _bytes(r["peak_rss_growth_bytes"])]
                for r in report["inference"]]),
        "",
    ]
    neuron = report["neuron"]
    shape_text = "x".join(str(s) for s in neuron["shape"])
    if neuron.get("spikingjelly_s") is not None:
        lines.append(f"Neuron forward+backward over a {shape_text} float32 tensor: spikelm `lif_multistep` "
                     f"{neuron['spikelm_s'] * 1000:.1f} ms, SpikingJelly `LIFNode(step_mode='m')` "
                     f"{neuron['spikingjelly_s'] * 1000:.1f} ms (ratio {neuron['ratio']:.2f}).")
    else:
        lines.append(f"Neuron forward+backward over a {shape_text} float32 tensor: spikelm `lif_multistep` "
                     f"{neuron['spikelm_s'] * 1000:.1f} ms; SpikingJelly: {neuron['note']}.")
    if neuron.get("spikelm_compiled_s") is not None:
        versus = (f" ({neuron['compiled_ratio']:.2f} of SpikingJelly's time)" if neuron.get("compiled_ratio")
                  else "")
        lines.append(f"With the compiled kernels (`--compile-neurons`): {neuron['spikelm_compiled_s'] * 1000:.1f} "
                     f"ms{versus}.")
    energy = report["energy"]
    lines += ["", f"Energy per token at context {energy['context']} (random weights: the firing rates are not "
              f"a trained model's): " + "; ".join(
                  f"{e['name']} {math.ceil(e['pj_per_token']):,} pJ vs GPT-2 {math.floor(e['ann_pj_per_token']):,} "
                  f"pJ (ratio {_ratio(e['energy_ratio'])}, firing rate {e['firing_rate']:.3f})" for e in energy["models"]),
              "", "Ratios:", ""]
    lines += [f"- {key.replace('_', ' ')}: " + ("n/a" if value is None else _ratio(value)
                                                 if key.startswith("energy") else f"{value:.3f}")
              for key, value in report["ratios"].items()]
    return "\n".join(lines) + "\n"


def results_page(bench=None, energy=None, perplexities=(), energy_plot=None, note=None):
    """docs/results.md from the JSON dicts (any of them may be missing); `note`: a paragraph under the title."""
    parts = ["# Results", "", "Made by `python eval/results_page.py` from the JSON files that `spikelm bench` and "
             "`spikelm eval` wrote.", ""]
    if note:
        parts += [note, ""]
    if bench:
        parts += ["## spikelm against a same-shape GPT-2", "", f"`{bench.get('command', 'spikelm bench')}`", "",
                  benchmark_markdown(bench)]
    if perplexities:
        parts += ["## Perplexity and bits per byte", "", perplexity_markdown(list(perplexities))]
    if energy:
        parts += ["## Energy report", "", energy_markdown(energy)]
        if energy_plot:
            parts += [f"![firing rate and energy per layer]({energy_plot})", ""]
    return "\n".join(parts)
