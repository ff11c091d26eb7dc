"""The quality table: spikelm against a parameter-matched GPT-2 and its own ANN twin, over seeds and budgets.

Every model trains on the same blocks in the same order (one order per seed), with the same optimiser and
schedule, after a short learning-rate sweep of its own (best of --lrs at --sweep-steps, seed --seeds[0]); then
each trains at every budget in --steps for every seed at its best learning rate. Held-out bits per byte score
the WHOLE held-out text, every token, with the same sliding window for every model (--window tokens, stride
half of it), so spikelm's unbounded recurrent context gives it no edge. Rows:

    spikelm (fixed decay), spikelm gated      the two decays, at the preset's T
    GPT-2 matched                             spikelm.references.matched_gpt2_config of the headline model
    ANN twin                                  spikelm.references.relu_twin_config of the headline model
    T=1, T=4                                  the headline model at other time steps
    attention zeroed                          the headline model with its attention branch's output zeroed
    distilled (with --teacher-steps N)        the headline model trained against the GPT-2 matched run of the
                                              same seed at N steps (a teacher trained longer than the student),
                                              loss (1-alpha) CE + alpha tau^2 KL, at the headline's learning rate

Writes results.json (every run, every curve point), quality.md (mean +- std over seeds, ratios to GPT-2
paired by seed) and quality.png (held-out bits per byte against training tokens, shaded by the seed spread)
in --output. Finished runs are kept in --output/runs/ and reused, so an interrupted table resumes.

    python eval/quality_table.py --preset small --steps 300 1000 3000 --seeds 0 1 2 --output docs/quality
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


# ================================================================ data: one tokenizer, one set of blocks


def prepare(output: Path, preset_name: str, block_size: int):
    """Train (once) the preset's tokenizer on the training part; -> (tokenizer, train blocks [N, block],
    held-out ids with the start token first, held-out UTF-8 bytes)."""
    import torch

    from spikelm.data import load_corpus, iter_texts, prepare_blocks
    from spikelm.evaluation import encode
    from spikelm.presets import preset
    from spikelm.loading import has_tokenizer, load_tokenizer
    from spikelm.tokenizer import train_tokenizer

    tokenizer_dir, cached = output / "tokenizer", output / f"blocks-{block_size}.pt"
    if cached.exists():  # every run of the table reads the same tensors
        data = torch.load(cached)
        return load_tokenizer(tokenizer_dir), data["train"], data["held_out"], data["held_out_bytes"]
    corpus = load_corpus()
    if has_tokenizer(tokenizer_dir):
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        tokenizer = train_tokenizer(iter_texts(corpus.train), tokenizer_dir, preset(preset_name)["vocab_size"])
    blocks = prepare_blocks(corpus, tokenizer, block_size)
    train = torch.tensor(blocks.train["input_ids"], dtype=torch.long)
    held_out_text = "".join(corpus.held_out["text"])
    held_out_ids, _ = encode(tokenizer, held_out_text)
    held_out, held_out_bytes = torch.tensor(held_out_ids), len(held_out_text.encode("utf-8"))
    torch.save({"train": train, "held_out": held_out, "held_out_bytes": held_out_bytes}, cached)
    return tokenizer, train, held_out, held_out_bytes


# ================================================================ the rows


def base_config(preset_name, tokenizer, gated):
    from spikelm import SpikeLMConfig
    from spikelm.presets import preset

    settings = preset(preset_name)
    settings.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, gated_decay=gated)
    return SpikeLMConfig(**settings)


def row_names(headline_gated: bool, preset_T: int):
    headline = "spikelm gated" if headline_gated else "spikelm"
    others = [T for T in (1, 2, 4) if T != preset_T]
    return ["spikelm", "spikelm gated", "GPT-2 matched", "ANN twin", f"{headline} attention zeroed"] + \
        [f"{headline} T={T}" for T in others]


def build(row: str, preset_name: str, tokenizer, block_size: int, headline_gated: bool):
    """The model of a row, freshly initialised (the caller seeds torch first)."""
    import torch
    from transformers import GPT2LMHeadModel

    from spikelm import SpikeLMForCausalLM
    from spikelm.references import config_fields, matched_gpt2_config, relu_twin_config

    if row.endswith(" distilled"):  # the same model as the plain row (and the same initial weights)
        return build(row.removesuffix(" distilled"), preset_name, tokenizer, block_size, headline_gated)
    if row in ("spikelm", "spikelm gated"):
        return SpikeLMForCausalLM(base_config(preset_name, tokenizer, gated=row == "spikelm gated"))
    headline = base_config(preset_name, tokenizer, headline_gated)
    if row == "GPT-2 matched":
        return GPT2LMHeadModel(matched_gpt2_config(headline, block_size))
    if row == "ANN twin":
        return SpikeLMForCausalLM(relu_twin_config(headline))
    if " T=" in row:
        T = int(row.split("T=")[1])
        return SpikeLMForCausalLM(type(headline)(**{**config_fields(headline), "time_steps": T}))
    if row.endswith("attention zeroed"):
        model = SpikeLMForCausalLM(headline)
        for layer in model.model.layers:  # the branch adds nothing to the residual stream
            layer.attention.register_forward_hook(lambda module, inputs, output: torch.zeros_like(output))
        return model
    raise ValueError(f"unknown row {row!r}")


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ================================================================ training and scoring


def held_out_bits_per_byte(model, ids, text_bytes, window, batch=32):
    """Every held-out token predicted exactly once, with the same sliding window for every model: windows of
    `window` tokens every window/2 tokens, each scoring the tokens after the previous window's end (so every
    token but the first window's has at least window/2 tokens of context). -> bits per UTF-8 byte."""
    import torch
    import torch.nn.functional as F

    spans, start, done = [], 0, 1  # (start, first scored position, end); ids[0] is the start token
    while done < len(ids):
        end = min(start + window, len(ids))
        spans.append((start, done, end))
        done, start = end, start + window // 2
    total = 0.0
    model.eval()
    with torch.no_grad():
        for first in range(0, len(spans), batch):
            group = spans[first:first + batch]
            padded = torch.stack([F.pad(ids[s:e], (0, window - (e - s))) for s, _, e in group])  # right-padded
            logits = model(input_ids=padded, use_cache=False).logits.float()  # logits[:, j] predicts ids[s + j + 1]
            for row, (s, a, e) in enumerate(group):
                total += F.cross_entropy(logits[row, a - s - 1:e - s - 1], ids[a:e], reduction="sum").item()
    model.train()
    assert sum(e - a for _, a, e in spans) == len(ids) - 1  # every token after the start token, once
    return total / math.log(2) / text_bytes


def run_path(job) -> Path:
    teacher = f"-teacher{job['teacher_steps']}" if job.get("teacher_steps") else ""
    name = f"{job['row'].replace(' ', '_')}-lr{job['lr']:g}-seed{job['seed']}-{job['steps']}{teacher}.json"
    return Path(job["output"]) / "runs" / name


def finished(job):
    """The result of a run already done, else None."""
    path = run_path(job)
    return json.loads(path.read_text()) if path.exists() else None


def run_one(job):
    """Train one (row, lr, seed, steps) and return its curve. Runs in a worker process."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    torch.set_num_threads(job["threads"])
    output = Path(job["output"])
    path = run_path(job)
    if path.exists():
        return json.loads(path.read_text())
    tokenizer, train, held_out, held_out_bytes = prepare(output, job["preset"], job["block_size"])
    torch.manual_seed(job["seed"])
    model = build(job["row"], job["preset"], tokenizer, job["block_size"], job["headline_gated"])
    model.train()
    # the same blocks in the same order for every model at this seed
    teacher = None
    if job.get("teacher_run"):  # the GPT-2 matched run of this seed, trained longer: frozen
        teacher = build("GPT-2 matched", job["preset"], tokenizer, job["block_size"], job["headline_gated"])
        teacher.load_state_dict(torch.load(Path(job["teacher_run"]).with_suffix(".pt")))
        teacher.eval().requires_grad_(False)
    order = torch.cat([torch.randperm(len(train), generator=torch.Generator().manual_seed(job["seed"] * 1000 + e))
                       for e in range(math.ceil(job["steps"] * job["batch_size"] / len(train)) + 1)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=job["lr"], betas=(0.9, 0.95), weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, int(0.05 * job["steps"])), job["steps"])
    curve = []  # (training tokens, held-out bits per byte)
    every = max(1, job["steps"] // job["curve_points"])
    started = time.time()
    for step in range(1, job["steps"] + 1):
        batch = train[order[(step - 1) * job["batch_size"]:step * job["batch_size"]]]
        if teacher is None:
            loss = model(input_ids=batch, labels=batch).loss
        else:
            from spikelm.distillation import distillation_loss

            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch).logits
            loss = distillation_loss(model(input_ids=batch).logits, teacher_logits, batch, job["alpha"],
                                     job["temperature"])
        if not torch.isfinite(loss):  # a diverged run scores what it scores: infinity
            curve.append((step * batch.numel(), float("inf")))
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % every == 0 or step == job["steps"]:
            curve.append((step * batch.numel(), held_out_bits_per_byte(model, held_out, held_out_bytes,
                                                                        job["window"])))
    result = {**job, "parameters": parameters(model), "curve": curve, "bits_per_byte": curve[-1][1],
              "train_seconds": time.time() - started}
    path.parent.mkdir(parents=True, exist_ok=True)
    if job["row"] in ("GPT-2 matched", "spikelm gated"):  # a teacher for the distilled row; a trained spikelm
        torch.save(model.state_dict(), path.with_suffix(".pt"))
    path.write_text(json.dumps(result) + "\n")
    print(f"{job['row']:>30} lr {job['lr']:g} seed {job['seed']} {job['steps']} steps: "
          f"{result['bits_per_byte']:.4f} bits/byte ({result['train_seconds']:.0f} s)", flush=True)
    return result


def run_all(jobs, workers):
    if workers <= 1:
        return [run_one(job) for job in jobs]
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(run_one, jobs))


# ================================================================ the table


def mean_std(values):
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(rows, sweeps, results, steps, seeds):
    table = {}
    gpt2 = {(r["seed"], r["steps"]): r["bits_per_byte"] for r in results if r["row"] == "GPT-2 matched"}
    for row in rows:
        entry = {"best_lr": sweeps[row]["best_lr"], "lr_sweep": sweeps[row]["bits_per_byte"], "budgets": {}}
        for budget in steps:
            runs = [r for r in results if r["row"] == row and r["steps"] == budget]
            if not runs:
                continue
            values = [r["bits_per_byte"] for r in runs]
            ratios = [r["bits_per_byte"] / gpt2[(r["seed"], budget)] for r in runs if (r["seed"], budget) in gpt2]
            entry["parameters"] = runs[0]["parameters"]
            entry["budgets"][str(budget)] = {
                "seeds": [r["seed"] for r in runs], "bits_per_byte": values,
                "mean": mean_std(values)[0], "std": mean_std(values)[1],
                "ratio_to_gpt2": ratios, "ratio_mean": mean_std(ratios)[0], "ratio_std": mean_std(ratios)[1],
                "tokens": budget * runs[0]["batch_size"] * runs[0]["block_size"],
            }
        table[row] = entry
    return table


def markdown(table, steps, settings):
    budgets = " | ".join(f"{s} steps: bits/byte | / GPT-2" for s in steps)
    lines = [f"| model | parameters | best lr | {budgets} |",
             "|---|---|---|" + "---|---|" * len(steps)]
    for row, entry in table.items():
        cells = []
        if "parameters" not in entry:
            continue
        for s in steps:
            b = entry["budgets"].get(str(s))
            if b is None:
                cells.append("- | -")
                continue
            if len(b["seeds"]) == 1:  # no spread to show
                cells.append(f"{b['mean']:.4f} (seed {b['seeds'][0]} only) | {b['ratio_mean']:.4f}")
                continue
            seeds = "" if len(b["seeds"]) == len(settings["seeds"]) else f" ({len(b['seeds'])} seeds)"
            cells.append(f"{b['mean']:.4f} +- {b['std']:.4f}{seeds} | {b['ratio_mean']:.4f} +- {b['ratio_std']:.4f}")
        lines.append(f"| {row} | {entry['parameters']:,} | {entry['best_lr']:g} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Mean +- standard deviation over seeds {settings['seeds']}; the ratio to GPT-2 is taken seed by seed "
                 f"(same blocks, same order). Preset {settings['preset']}, batch {settings['batch_size']} x "
                 f"{settings['block_size']} tokens, AdamW (0.9, 0.95), weight decay 0.01, cosine schedule with 5% "
                 f"warm-up, clipping 1.0; learning rate: best of {settings['lrs']} at {settings['sweep_steps']} "
                 f"steps, seed {settings['seeds'][0]}. The whole held-out text scored ({settings['held_out_tokens']:,} "
                 f"tokens, {settings['held_out_bytes']:,} bytes), windows of {settings['window']} tokens, "
                 f"stride {settings['window'] // 2}.")
    return "\n".join(lines) + "\n"


def plot(results, rows, steps, seeds, path):
    """One panel per budget: held-out bits per byte along each run, a line per row (mean over its seeds),
    shaded from the lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(steps), figsize=(6 * len(steps), 5), squeeze=False)
    for ax, budget in zip(axes[0], steps):
        for row in rows:
            curves = [r["curve"] for r in results if r["row"] == row and r["steps"] == budget]
            if not curves:
                continue
            # each point over the seeds scored there (a sweep's run, reused as seed 0, was scored only at its end)
            tokens = sorted({t for c in curves for t, _ in c})
            at = [[dict(c)[t] for c in curves if t in dict(c)] for t in tokens]
            line, = ax.plot(tokens, [np.mean(v) for v in at], marker="o", markersize=3, color=f"C{rows.index(row)}",
                            label=f"{row} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
            ax.fill_between(tokens, [min(v) for v in at], [max(v) for v in at], color=line.get_color(), alpha=0.2)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("held-out bits per byte")
        ax.set_title(f"{budget} steps (cosine schedule to the end)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"lines: mean over seeds {seeds}; shading: lowest to highest seed (a learning-rate sweep's run, "
                 "reused as seed 0, is scored only at its end)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, nargs="+", default=[300, 1000, 3000], help="training budgets")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2], help="the sweep")
    parser.add_argument("--sweep-steps", type=int, default=300)
    parser.add_argument("--rows", nargs="+", default=None, help="a subset of the rows (default: all)")
    parser.add_argument("--sweep-rows", nargs="+", default=None,
                        help="rows with a learning-rate sweep of their own (default: all); the others take the "
                             "headline row's best learning rate")
    parser.add_argument("--summarise-only", action="store_true",
                        help="write the table from the runs finished so far (rows missing a seed show fewer)")
    parser.add_argument("--headline", choices=("fixed", "gated"), default="gated",
                        help="the spikelm row whose T ablation, ANN twin and zeroed attention the table shows")
    parser.add_argument("--teacher-steps", type=int, default=None,
                        help="add the distilled row: the headline model taught by the GPT-2 matched run of the same "
                             "seed at this many steps (run first if it is not among --steps)")
    parser.add_argument("--distill-steps", type=int, nargs="+", default=None,
                        help="the budgets of the distilled row (default: the --steps below --teacher-steps)")
    parser.add_argument("--alpha", type=float, default=0.5, help="distillation: weight of the KL term")
    parser.add_argument("--temperature", type=float, default=2.0, help="distillation: softmax temperature")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--window", type=int, default=128, help="scoring window (stride: half)")
    parser.add_argument("--curve-points", type=int, default=10, help="held-out scores along each run")
    parser.add_argument("--workers", type=int, default=1, help="runs in parallel (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--output", default="docs/quality")
    args = parser.parse_args(argv)

    from spikelm.presets import preset

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer, train, held_out, held_out_bytes = prepare(output, args.preset, args.block_size)  # once, up front
    headline_gated = args.headline == "gated"
    rows = args.rows or row_names(headline_gated, preset(args.preset)["time_steps"])
    common = dict(preset=args.preset, batch_size=args.batch_size, block_size=args.block_size, window=args.window,
                  curve_points=args.curve_points, threads=args.threads, output=str(output),
                  headline_gated=headline_gated)

    headline = "spikelm gated" if headline_gated else "spikelm"
    sweep_rows = args.sweep_rows or rows
    sweep_jobs = [dict(common, row=row, lr=lr, seed=args.seeds[0], steps=args.sweep_steps, curve_points=1)
                  for row in sweep_rows for lr in args.lrs]
    sweep_results = run_all(sweep_jobs, args.workers)
    sweeps = {}
    for row in sweep_rows:
        scores = {r["lr"]: r["bits_per_byte"] for r in sweep_results if r["row"] == row}
        sweeps[row] = {"bits_per_byte": {f"{lr:g}": v for lr, v in scores.items()},
                       "best_lr": min(scores, key=scores.get)}
    for row in rows:  # rows without a sweep of their own (variants of the headline model) take its lr
        if row not in sweeps:
            sweeps[row] = {"bits_per_byte": {}, "best_lr": sweeps[headline]["best_lr"]}
    jobs = [dict(common, row=row, lr=sweeps[row]["best_lr"], seed=seed, steps=steps)
            for steps in args.steps for seed in args.seeds for row in rows]
    # the swept rows over every seed first, then the other rows seed by seed: a table cut short by time still
    # has the main comparison complete
    jobs.sort(key=lambda job: (job["steps"], job["row"] not in sweep_rows and 1 + args.seeds.index(job["seed"])))
    students = []
    if args.teacher_steps:  # the teachers first (they may be a budget of their own), then the students
        teachers = {seed: dict(common, row="GPT-2 matched", lr=sweeps["GPT-2 matched"]["best_lr"], seed=seed,
                               steps=args.teacher_steps) for seed in args.seeds}
        distilled = f"{headline} distilled"
        rows = rows + [distilled]
        sweeps[distilled] = {"bits_per_byte": {}, "best_lr": sweeps[headline]["best_lr"]}
        budgets = args.distill_steps or [s for s in args.steps if s < args.teacher_steps]
        jobs += [teachers[seed] for seed in args.seeds if teachers[seed] not in jobs]
        students = [dict(common, row=distilled, lr=sweeps[headline]["best_lr"], seed=seed, steps=steps,
                      teacher_run=str(run_path(teachers[seed])), teacher_steps=args.teacher_steps,
                      alpha=args.alpha, temperature=args.temperature)
                 for steps in budgets for seed in args.seeds]
    if args.summarise_only:  # the runs finished so far
        results = [r for r in map(finished, jobs + students) if r is not None]
    else:
        results = run_all(jobs, args.workers) + run_all(students, args.workers)

    settings = {**vars(args), "held_out_tokens": len(held_out), "held_out_bytes": held_out_bytes,
                "train_blocks": len(train), "torch_threads": args.threads, "machine": os.uname().nodename}
    table = summarise(rows, sweeps, results, args.steps, args.seeds)
    (output / "results.json").write_text(json.dumps({"settings": settings, "table": table,
                                                     "sweep_runs": sweep_results, "runs": results}, indent=1) + "\n")
    (output / "quality.md").write_text(markdown(table, args.steps, settings))
    plot(results, rows, args.steps, args.seeds, output / "quality.png")
    print((output / "quality.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
