"""Model cards: the README.md that `spikelm train`, `distill` and `convert` write beside a saved model.

The card is in the Hugging Face Hub's format (YAML front matter: library, tags, base model, datasets; then
Markdown), so that uploading the directory (`huggingface-cli upload ORG/NAME DIR`, or `push_to_hub`) publishes
something a stranger can use: what the model is, how well it predicts held-out text, what a token costs in
energy against a same-shape GPT-2, how it was trained, and how to load it.
"""

import json
import math
from pathlib import Path

from .reporting import _ratio as ratio_up  # rounded up, against the model

CARD_FILE = "README.md"


def _yaml_list(values) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def card_energy(model, input_ids) -> dict | None:
    """The energy report of a spiking model reading `input_ids` [1, N] (None for other models, and for the
    QCFS twin, whose matrices receive real values)."""
    config = model.config
    if config.model_type != "spikelm" or config.neuron_type == "qcfs":
        return None
    from .energy import energy_report

    return energy_report(model, input_ids.to(model.device))


def model_card(config, metrics: dict | None = None, energy: dict | None = None, command: str | None = None,
               base_model: str | None = None, datasets=(), corpus: str | None = None) -> str:
    """The card's text. metrics: results.json's figures (eval_bits_per_byte, start_eval_bits_per_byte, ...);
    energy: spikelm.energy's report on a held-out block; base_model: the teacher or the model fine-tuned from
    (a hub id or a path); datasets: hub dataset ids the model saw; corpus: what it was trained on, in words."""
    spiking = config.model_type == "spikelm"
    tags = ["spikelm", "text-generation"] + (["spiking-neural-network", "energy-efficient"] if spiking else [])
    front = ["---", "library_name: transformers", f"tags: {_yaml_list(tags)}", "pipeline_tag: text-generation"]
    if base_model:
        front.append(f"base_model: {json.dumps(str(base_model))}")
    if datasets:
        front.append(f"datasets: {_yaml_list(datasets)}")
    front.append("---")

    kind = config.model_type
    if spiking:
        kind = (f"spiking language model (spikelm: {config.num_hidden_layers} layers, width {config.hidden_size}, "
                f"{config.num_attention_heads} heads, T={config.time_steps} time steps, {config.neuron_type} "
                f"neurons, {config.attention_type} attention, vocabulary {config.vocab_size})")
    lines = ["", "# Model card", "", f"A {kind}."]
    if base_model:
        lines.append(f"Started from / distilled from `{base_model}`.")
    if corpus:
        lines.append(f"Trained on {corpus}.")

    lines += ["", "## Held-out quality", ""]
    if metrics and "eval_bits_per_byte" in metrics:
        start = metrics.get("start_eval_bits_per_byte")
        lines.append(f"- bits per byte: {metrics['eval_bits_per_byte']:.4f}"
                     + (f" (before training: {start:.4f})" if start is not None else ""))
        if "eval_perplexity" in metrics:
            lines.append(f"- perplexity per token: {metrics['eval_perplexity']:.2f}")
        if "global_step" in metrics:
            lines.append(f"- optimiser steps: {metrics['global_step']}")
    else:
        lines.append("Not measured.")

    if energy is not None:
        lines += ["", "## Energy per token", "",
                  f"Counted from the spikes that flowed on {energy['tokens']} held-out tokens (spikelm.energy: "
                  f"{energy['e_ac_pj']} pJ per accumulate, {energy['e_mac_pj']} pJ per multiply-accumulate).", "",
                  "| model | pJ/token | ACs/token | MACs/token |", "|---|---|---|---|",
                  # rounded against this model: its costs up, GPT-2's down, the ratio up
                  f"| this model | {math.ceil(energy['pj_per_token'])} | {math.ceil(energy['ac_per_token'])} | "
                  f"{math.ceil(energy['mac_per_token'])} |",
                  f"| same-shape GPT-2 (all MACs) | {math.floor(energy['ann_pj_per_token'])} | 0 | "
                  f"{math.floor(energy['ann_mac_per_token'])} |", "",
                  f"Ratio to GPT-2: {ratio_up(energy['energy_ratio'])}. Firing rate "
                  f"{energy['firing_rate']:.3f}; per layer: "
                  + ", ".join(f"{layer} {rate:.3f}" for layer, rate in energy["firing_rate_per_layer"].items())
                  + "."]

    if command:
        lines += ["", "## Training", "", "```bash", command, "```"]

    remote = ", trust_remote_code=True" if spiking else ""
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f"model = AutoModelForCausalLM.from_pretrained(\"ORG/NAME\"{remote})  # or this directory",
              "tokenizer = AutoTokenizer.from_pretrained(\"ORG/NAME\")",
              "ids = tokenizer(\"ROMEO:\", return_tensors=\"pt\").input_ids",
              "print(tokenizer.decode(model.generate(ids, max_new_tokens=50)[0]))", "```"]
    if spiking:
        lines += ["", "The directory carries the model code, so `trust_remote_code=True` loads it without spikelm "
                      "installed; with spikelm installed (`pip install spikelm`), `import spikelm` registers it and "
                      "`spikelm generate --model ORG/NAME` prints the energy of every token."]
    return "\n".join(front + lines) + "\n"


def write_model_card(directory, config, **details) -> Path:
    """Write `model_card(config, **details)` to DIRECTORY/README.md; -> its path."""
    path = Path(directory) / CARD_FILE
    path.write_text(model_card(config, **details), encoding="utf-8")
    return path
