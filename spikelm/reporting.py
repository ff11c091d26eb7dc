"""Markdown tables and plots made from the JSON that `spikelm eval` and `spikelm bench` write.

Pure functions of the JSON dicts: the numbers are measured once, and the pages (docs/results.md) are
rendered from the files, so a page can be remade without measuring again.
"""

from pathlib import Path


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _n(x, digits=3):
    """A number for a table: integers with thousands separators, small ones with `digits` significant digits."""
    if x is None:
        return "n/a"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _bytes(n):
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


# ================================================================ energy


def energy_markdown(report):
    """The energy report as Markdown: a summary, then one row per layer and kind (per token)."""
    config = report["config"]
    lines = [
        f"Energy per token of spikelm (D={config['hidden_size']}, {config['num_hidden_layers']} layers, "
        f"{config['num_attention_heads']} heads, T={config['time_steps']}, {config['attention_type']}, "
        f"vocabulary {config['vocab_size']}) over {report['tokens']} tokens, "
        f"E_AC = {report['e_ac_pj']} pJ, E_MAC = {report['e_mac_pj']} pJ.",
        "",
        _table(["", "spikelm", "same-shape GPT-2", "ratio"], [
            ["pJ per token", _n(report["pj_per_token"]), _n(report["ann_pj_per_token"]),
             f"{report['energy_ratio']:.3f}"],
            ["ACs per token", _n(report["ac_per_token"]), "0", ""],
            ["MACs per token", _n(report["mac_per_token"]), _n(report["ann_mac_per_token"]),
             f"{report['mac_per_token'] / report['ann_mac_per_token']:.3f}"],
            ["spikes per token", _n(report["spikes_per_token"]), "", ""],
            ["firing rate", f"{report['firing_rate']:.4f}", "", ""],
        ]),
        "",
        "Per layer (per token):",
        "",
        _table(["layer", "firing rate", "spikes", "ACs", "MACs", "pJ", "GPT-2 pJ"],
               [[layer, f"{rate:.4f}", _n(report.get("spikes_per_token_per_layer", {}).get(layer)),
                 _n(sum(r["ac"] for r in report["rows"] if r["layer"] == layer)),
                 _n(sum(r["mac"] for r in report["rows"] if r["layer"] == layer)),
                 _n(sum(r["pj"] for r in report["rows"] if r["layer"] == layer)),
                 _n(report.get("ann_per_layer", {}).get(layer, {}).get("pj"))]
                for layer, rate in report["firing_rate_per_layer"].items()]),
        "",
        "By layer and kind (per token):",
        "",
        _table(["layer", "kind", "ACs", "MACs", "pJ"],
               [[row["layer"], row["kind"], _n(row["ac"]), _n(row["mac"]), _n(row["pj"])] for row in report["rows"]]),
    ]
    return "\n".join(lines) + "\n"


def _layer_energy(report):
    """pJ per token by layer and kind: {kind: [pJ for each layer in order]}, and the layer labels."""
    layers = list(report["firing_rate_per_layer"])
    by_kind = {}
    for row in report["rows"]:
        by_kind.setdefault(row["kind"], [0.0] * len(layers))[layers.index(row["layer"])] += row["pj"]
    return layers, by_kind


def plot_energy(report, path):
    """Two panels: firing rate per layer, and energy per token per layer stacked by kind, with the
    same-shape GPT-2's per-layer energy as markers."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    layers, by_kind = _layer_energy(report)
    x = range(len(layers))
    figure, (rates, energy) = plt.subplots(1, 2, figsize=(11, 4))
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
    energy.set(title=f"energy per token (x{report['energy_ratio']:.2f} of GPT-2 in all)", ylabel="pJ per token",
               xticks=list(x))
    energy.set_xticklabels(layers, rotation=30)
    top = max(bottom + [report.get("ann_per_layer", {}).get(layer, {}).get("pj", 0) for layer in layers])
    energy.set_ylim(0, 1.3 * top)  # room for the legend above the bars
    energy.legend(fontsize=8, ncol=3, loc="upper center")
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
        f"Inference, batch 1, greedy; decode = {report['settings']['decode_tokens']} steps after the prefill. "
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
                  f"{e['name']} {e['pj_per_token']:,.0f} pJ vs GPT-2 {e['ann_pj_per_token']:,.0f} pJ "
                  f"(ratio {e['energy_ratio']:.3f}, firing rate {e['firing_rate']:.3f})" for e in energy["models"]),
              "", "Ratios:", ""]
    lines += [f"- {key.replace('_', ' ')}: {value:.3f}" if value is not None else f"- {key.replace('_', ' ')}: n/a"
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
