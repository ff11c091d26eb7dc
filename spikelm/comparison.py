"""The roads to a spiking LM, side by side: one command, one corpus, one step budget, one table.

    (a) GPT-2 of the same shape (the ANN reference and teacher)   spikelm train --arch gpt2
    (b) spikelm from scratch (surrogate gradients)                spikelm train
    (c) spikelm distilled from (a)                                spikelm distill --teacher (a)
    (d) the ANN twin (QCFS activations)                           spikelm convert (its first half)
    (e) (d) converted to IF neurons, before fine-tuning           spikelm convert
    (f) (e) distilled from (d)                                    spikelm distill --model (e) --teacher (d)

Every run uses the same tokenizer, block size, held-out text and number of optimiser steps; (f) spends that
budget again on top of (d)'s. The table gives held-out bits per byte and, for each model, the energy per token
on one held-out block (GPT-2: its MACs at E_MAC, counted as in spikelm.energy).
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from .cli import main as spikelm
from .energy import E_MAC_PJ, energy_report, gpt2_reference_counts
from .errors import SpikeLMError

ROWS = [
    ("a", "gpt2", "GPT-2 (same shape)"),
    ("b", "spikelm", "spikelm from scratch"),
    ("c", "distilled", "spikelm distilled from (a)"),
    ("d", "converted/ann-twin", "ANN twin (QCFS)"),
    ("e", "converted", "converted, before fine-tuning"),
    ("f", "converted-distilled", "converted, distilled from (d)"),
]


def _run(argv):
    code = spikelm(argv)
    if code != 0:
        raise SpikeLMError(f"`spikelm {' '.join(argv)}` failed with exit code {code}")


def _energy(directory, input_ids):
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    config = model.config
    if config.model_type != "spikelm":  # the ANN reference: all MACs
        macs = gpt2_reference_counts(config, input_ids.shape[1])["total"]
        return {"pj_per_token": E_MAC_PJ * macs / input_ids.shape[1], "firing_rate": None}
    if config.neuron_type == "qcfs":
        return {"pj_per_token": None, "firing_rate": None}  # an ANN: its matrices get real values
    report = energy_report(model, input_ids)
    return {"pj_per_token": report["pj_per_token"], "firing_rate": report["firing_rate"]}


def distillation_table(output, preset="small", steps=300, block_size=128, corpus=None, extra=()):
    output = Path(output)
    corpus_flag = ["--corpus", corpus] if corpus else []
    tokenizer = output / "tokenizer"
    if not (tokenizer / "tokenizer.json").exists():
        from .presets import preset as preset_fields

        _run(["tokenizer", "--output", str(tokenizer), "--vocab-size", str(preset_fields(preset)["vocab_size"]),
              *corpus_flag])
    budget = ["--max-steps", str(steps), "--block-size", str(block_size), "--eval-steps", str(steps),
              "--save-steps", str(steps), "--tokenizer", str(tokenizer), *corpus_flag, *extra]
    new = ["--preset", preset, *budget]  # a fresh model of the preset's shape
    _run(["train", "--arch", "gpt2", "--output", str(output / "gpt2"), *new])
    _run(["train", "--output", str(output / "spikelm"), *new])
    _run(["distill", "--teacher", str(output / "gpt2"), "--output", str(output / "distilled"), *new])
    _run(["convert", "--output", str(output / "converted"), *new])
    _run(["distill", "--model", str(output / "converted"), "--teacher", str(output / "converted" / "ann-twin"),
          "--output", str(output / "converted-distilled"), *budget])

    # one held-out block, the same for every model
    from .data import load_corpus, prepare_blocks
    from .tokenizer import load_tokenizer

    blocks = prepare_blocks(load_corpus(corpus), load_tokenizer(tokenizer), block_size, 1)
    input_ids = torch.tensor([blocks.held_out[0]["input_ids"]])
    conversion = json.loads((output / "converted" / "conversion.json").read_text())
    rows = []
    for key, folder, name in ROWS:
        directory = output / folder
        if key == "e":
            bits = conversion["converted_bits_per_byte"]
        else:
            bits = json.loads((directory / "results.json").read_text())["eval_bits_per_byte"]
        rows.append({"key": key, "model": name, "directory": str(directory), "bits_per_byte": bits,
                     "steps": steps * (2 if key == "f" else 1), **_energy(directory, input_ids)})
    reference = rows[0]
    for row in rows:
        row["bits_per_byte_vs_gpt2"] = row["bits_per_byte"] / reference["bits_per_byte"]
        row["energy_vs_gpt2"] = (row["pj_per_token"] / reference["pj_per_token"]
                                 if row["pj_per_token"] is not None else None)
    table = {"preset": preset, "steps": steps, "block_size": block_size, "corpus": corpus or "bundled",
             "rows": rows}
    (output / "distillation_table.json").write_text(json.dumps(table, indent=2) + "\n")
    (output / "distillation_table.md").write_text(markdown(table))
    print(markdown(table))
    return table


def markdown(table):
    lines = [f"Preset `{table['preset']}`, {table['steps']} steps, block {table['block_size']}, corpus "
             f"{table['corpus']}.", "",
             "| | model | steps | held-out bits/byte | vs GPT-2 | pJ/token | vs GPT-2 | firing rate |",
             "|---|---|---|---|---|---|---|---|"]
    for row in table["rows"]:
        pj = f"{row['pj_per_token']:.0f}" if row["pj_per_token"] is not None else "(ANN)"
        ratio = f"{row['energy_vs_gpt2']:.3f}" if row["energy_vs_gpt2"] is not None else ""
        rate = f"{row['firing_rate']:.3f}" if row["firing_rate"] is not None else ""
        lines.append(f"| ({row['key']}) | {row['model']} | {row['steps']} | {row['bits_per_byte']:.3f} | "
                     f"{row['bits_per_byte_vs_gpt2']:.3f} | {pj} | {ratio} | {rate} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/distillation")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--corpus", default=None)
    args = parser.parse_args(argv)
    distillation_table(args.output, args.preset, args.steps, args.block_size, args.corpus)
    return 0
