"""Does starting from a teacher pay? A GPT-2-shaped teacher with a byte-level BPE tokenizer, trained on the
bundled corpus for longer than the students, then three students at an equal step budget and several seeds:

    (a) spikelm from scratch                      spikelm train
    (b) distilled from the teacher                spikelm distill --teacher T
    (c) distilled, starting from its weights      spikelm distill --teacher T --init-from-teacher

    python eval/teacher_student_table.py --preset tiny --steps 200 --teacher-steps 600 --seeds 0 1 2 \
        --output runs/teacher_student

Every student has the teacher's shape (the preset's width, depth, heads and MLP) and its tokenizer, the same
blocks and held-out text. Writes teacher_student.json, .md (held-out bits per byte, mean and spread over the
seeds, and the gap to the teacher) and .png. With internet, a pretrained teacher takes the teacher's place:
    spikelm distill --teacher gpt2 --init-from-teacher --time-steps 4 --output runs/from-gpt2
"""

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import torch
from transformers import GPT2Config, PreTrainedTokenizerFast

from spikelm.data import default_corpus, iter_texts, load_corpus, quiet_datasets
from spikelm.distillation import distill
from spikelm.loading import load_model
from spikelm.presets import preset as preset_fields
from spikelm.teacher_init import init_from_teacher
from spikelm.training import TrainingOptions, build_config, prepare_data, train

ROWS = (("a", "scratch", "spikelm from scratch"), ("b", "distilled", "distilled from the teacher"),
        ("c", "init", "distilled, initialised from the teacher"))


def byte_level_bpe(texts, vocab_size, directory):
    """A GPT-2-style byte-level BPE tokenizer trained here (the tokenizers library), saved in `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>",
                                      eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    wrapped.save_pretrained(directory)
    return wrapped


def teacher_config(preset_name, tokenizer, block_size):
    """GPT-2 of the preset's shape: the students, initialised from it or not, have the same one."""
    shape = preset_fields(preset_name)
    return GPT2Config(vocab_size=len(tokenizer), n_embd=shape["hidden_size"], n_layer=shape["num_hidden_layers"],
                      n_head=shape["num_attention_heads"], n_inner=shape["intermediate_size"],
                      n_positions=max(1024, block_size), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def bits(directory):
    return json.loads((Path(directory) / "results.json").read_text())["eval_bits_per_byte"]


def table(output, preset="tiny", steps=200, teacher_steps=600, seeds=(0, 1, 2), block_size=128, vocab_size=512,
          lr=3e-3):
    output = Path(output)
    with quiet_datasets():
        corpus = load_corpus(None)
        tokenizer = byte_level_bpe(iter_texts(corpus.train), vocab_size, output / "tokenizer")
    base = TrainingOptions(output=str(output / "teacher"), max_steps=teacher_steps, block_size=block_size,
                           eval_steps=teacher_steps, save_steps=teacher_steps, lr=lr, max_eval_blocks=64)
    data = prepare_data(base, tokenizer=tokenizer)
    if not (output / "teacher" / "results.json").exists():
        train(teacher_config(preset, tokenizer, block_size), data, base)
    teacher = load_model(output / "teacher")
    time_steps = preset_fields(preset)["time_steps"]
    runs = []
    for seed in seeds:
        for key, folder, _ in ROWS:
            options = dataclasses.replace(base, output=str(output / f"{folder}-seed{seed}"), max_steps=steps,
                                          eval_steps=steps, save_steps=steps, seed=seed)
            if not (Path(options.output) / "results.json").exists():
                if key == "a":
                    train(build_config(preset, tokenizer), data, options)
                elif key == "b":
                    distill(build_config(preset, tokenizer), teacher, data, options)
                else:
                    rows = [r["input_ids"] for r in data.blocks.train.select(range(16))]
                    batches = [torch.tensor(rows[i:i + 4]) for i in range(0, 16, 4)]
                    distill(init_from_teacher(teacher, batches, time_steps=time_steps), teacher, data, options)
            runs.append({"key": key, "seed": seed, "bits_per_byte": bits(options.output)})
    teacher_bits = bits(output / "teacher")
    summary = []
    for key, _, name in ROWS:
        values = [r["bits_per_byte"] for r in runs if r["key"] == key]
        mean = statistics.mean(values)
        summary.append({"key": key, "model": name, "bits_per_byte_mean": mean,
                        "bits_per_byte_stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
                        "gap_to_teacher": mean - teacher_bits, "seeds": len(values)})
    report = {"preset": preset, "student_steps": steps, "teacher_steps": teacher_steps, "seeds": list(seeds),
              "block_size": block_size, "vocab_size": len(tokenizer), "corpus": str(default_corpus().name),
              "teacher_bits_per_byte": teacher_bits, "rows": summary, "runs": runs}
    (output / "teacher_student.json").write_text(json.dumps(report, indent=2) + "\n")
    (output / "teacher_student.md").write_text(markdown(report))
    plot(report, output / "teacher_student.png")
    print(markdown(report))
    return report


def markdown(report):
    lines = [f"Preset `{report['preset']}`, byte-level BPE ({report['vocab_size']} tokens), students "
             f"{report['student_steps']} steps, teacher (GPT-2, same shape) {report['teacher_steps']} steps: "
             f"{report['teacher_bits_per_byte']:.3f} bits per byte; seeds {report['seeds']}.", "",
             "| | student | held-out bits/byte (mean ± sd) | gap to the teacher |", "|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(f"| ({row['key']}) | {row['model']} | {row['bits_per_byte_mean']:.3f} ± "
                     f"{row['bits_per_byte_stdev']:.3f} | {row['gap_to_teacher']:+.3f} |")
    return "\n".join(lines) + "\n"


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["key"] for r in rows], [r["bits_per_byte_mean"] for r in rows],
           yerr=[r["bits_per_byte_stdev"] for r in rows], color="#4c72b0", capsize=4)
    ax.axhline(report["teacher_bits_per_byte"], color="#c44e52", linestyle="--", label="teacher (GPT-2)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_xticks(range(len(rows)), [r["model"].replace(", ", ",\n") for r in rows], fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/teacher_student")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps of each student")
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=512, help="byte-level BPE tokens")
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    table(args.output, args.preset, args.steps, args.teacher_steps, args.seeds, args.block_size, args.vocab_size,
          args.lr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
