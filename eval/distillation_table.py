"""The roads to a spiking LM, side by side: one corpus, one step budget, one table (JSON and Markdown).

    python eval/distillation_table.py --preset small --steps 300 --output runs/distillation

    (a) GPT-2 of the same shape (the ANN reference and teacher)   spikelm train --arch gpt2
    (b) spikelm from scratch (surrogate gradients)                spikelm train
    (c) spikelm distilled from (a)                                spikelm distill --teacher (a)
    (d) the ANN twin (QCFS activations)                           spikelm convert (its first half)
    (e) (d) converted to IF neurons, before fine-tuning           spikelm convert
    (f) (e) distilled from (d)                                    spikelm distill --model (e) --teacher (d)

Each row is the library call its command makes. Every run uses the same tokenizer, block size, held-out text
and number of optimiser steps; (f) spends that budget again on top of (d)'s. The table gives held-out bits per
byte and, for each model, the energy per token on one held-out block (GPT-2: its MACs at E_MAC, counted as in
spikelm.energy).
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from spikelm.conversion import TWIN_DIR, train_and_convert
from spikelm.data import iter_texts, load_corpus, quiet_datasets
from spikelm.distillation import check_teacher, distill
from spikelm.energy import E_MAC_PJ, energy_report, gpt2_reference_counts
from spikelm.loading import has_tokenizer, load_model
from spikelm.presets import preset as preset_fields
from spikelm.tokenizer import train_tokenizer
from spikelm.training import TrainingOptions, build_config, gpt2_config, prepare_data, train

ROWS = [
    ("a", "gpt2", "GPT-2 (same shape)"),
    ("b", "spikelm", "spikelm from scratch"),
    ("c", "distilled", "spikelm distilled from (a)"),
    ("d", "converted/ann-twin", "ANN twin (QCFS)"),
    ("e", "converted", "converted, before fine-tuning"),
    ("f", "converted-distilled", "converted, distilled from (d)"),
]


def _energy(directory, input_ids):
    model = load_model(directory)
    config = model.config
    if config.model_type != "spikelm":  # the ANN reference: all MACs
        macs = gpt2_reference_counts(config, input_ids.shape[1])["total"]
        return {"pj_per_token": E_MAC_PJ * macs / input_ids.shape[1], "firing_rate": None}
    if config.neuron_type == "qcfs":
        return {"pj_per_token": None, "firing_rate": None}  # an ANN: its matrices get real values
    report = energy_report(model, input_ids)
    return {"pj_per_token": report["pj_per_token"], "firing_rate": report["firing_rate"]}


def distillation_table(output, preset="small", steps=300, block_size=128, corpus=None):
    output = Path(output)
    tokenizer_dir = output / "tokenizer"
    if not has_tokenizer(tokenizer_dir):
        with quiet_datasets():
            train_tokenizer(iter_texts(load_corpus(corpus).train), tokenizer_dir, preset_fields(preset)["vocab_size"])
    options = TrainingOptions(output=str(output / "gpt2"), corpus=corpus, max_steps=steps, block_size=block_size,
                              eval_steps=steps, save_steps=steps)
    data = prepare_data(options, tokenizer=tokenizer_dir)
    tokenizer = data.tokenizer

    def at(folder):  # the same budget, another output folder
        return dataclasses.replace(options, output=str(output / folder))

    train(gpt2_config(preset, tokenizer, block_size), data, at("gpt2"))
    train(build_config(preset, tokenizer), data, at("spikelm"))
    teacher = load_model(output / "gpt2")
    check_teacher(teacher, tokenizer)
    distill(build_config(preset, tokenizer), teacher, data, at("distilled"))
    train_and_convert(build_config(preset, tokenizer), data, at("converted"))
    distill(load_model(output / "converted"), load_model(output / "converted" / TWIN_DIR), data,
            at("converted-distilled"))

    # one held-out block, the same for every model
    input_ids = torch.tensor([data.blocks.held_out[0]["input_ids"]])
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
    parser.add_argument("--corpus", default=None, help="default: the bundled corpus")
    args = parser.parse_args(argv)
    distillation_table(args.output, args.preset, args.steps, args.block_size, args.corpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
