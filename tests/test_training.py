"""`spikelm train`, run as a real command: from scratch, fine-tuning, resuming after SIGKILL, two processes
under `accelerate launch`, and bad input. Tiny preset and tiny corpora: each run takes seconds. The command
runs in this process (helpers.spikelm) except where a fresh interpreter is the point: a process killed
mid-run, and two processes under accelerate."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, shakespeare_text
from helpers import spikelm
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from spikelm.data import load_corpus, prepare_blocks

# one thread per process: tiny models gain nothing from more, and the CPUs are shared
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TINY = ["--preset", "tiny", "--block-size", "32", "--batch-size", "8", "--max-eval-blocks", "8",
        "--logging-steps", "10", "--eval-steps", "1000"]
CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "config.json",
                    "tokenizer.json")


def spikelm_process(*args, timeout=300):
    """`python -m spikelm.cli ARGS...` in a process of its own."""
    return subprocess.run([sys.executable, "-m", "spikelm.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout, cwd=REPO)


def results(directory):
    return json.loads((Path(directory) / "results.json").read_text())


def log_history(directory):
    return json.loads((Path(directory) / "trainer_state.json").read_text())["log_history"]


@pytest.fixture(scope="module")
def corpus_a(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "a.txt"
    path.write_text(shakespeare_text(20_000), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_a):
    output = tmp_path_factory.mktemp("trained")
    run = spikelm("train", "--corpus", corpus_a, "--output", output, "--max-steps", 40, *TINY)
    assert run.returncode == 0, run.stderr[-3000:]
    return output


def test_train_writes_a_loadable_directory(trained):
    model = AutoModelForCausalLM.from_pretrained(trained)
    tokenizer = AutoTokenizer.from_pretrained(trained)
    assert model.config.model_type == "spikelm" and model.config.vocab_size == len(tokenizer) == 384
    assert model.config.gated_decay  # the presets' decay
    assert (trained / "model.safetensors").exists()
    summary = results(trained)
    assert summary["global_step"] == 40
    # it learned something: held-out bits per byte went down from the untrained model's
    assert summary["eval_bits_per_byte"] < summary["start_eval_bits_per_byte"] - 0.3
    assert summary["eval_pj_per_token"] > 0 and 0 < summary["eval_firing_rate"] < 1
    ids = tokenizer("ROMEO:", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape == (1, ids.shape[1] + 5)
    # the model card: the Hub's front matter, this run's figures and command
    card = (trained / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert f"bits per byte: {summary['eval_bits_per_byte']:.4f}" in card and "--max-steps 40" in card
    assert "Ratio to GPT-2" in card and "trust_remote_code=True" in card


def test_decay_flag_chooses_the_fixed_decay(corpus_a, tmp_path):
    run = spikelm("train", "--corpus", corpus_a, "--output", tmp_path / "fixed", "--max-steps", 2, "--decay", "fixed",
                  *TINY)
    assert run.returncode == 0, run.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fixed")
    assert not model.config.gated_decay and model.model.layers[0].attention.gate_proj is None


def _second_corpus(path):
    full = shakespeare_text(10**8)
    text = full[-20_000:] if len(full) > 100_000 else "\n".join(line[::-1] for line in full[:20_000].splitlines())
    path.write_text(text, encoding="utf-8")
    return path


def test_fine_tuning_starts_from_the_saved_weights(trained, tmp_path):
    corpus_b = _second_corpus(tmp_path / "b.txt")
    output = tmp_path / "tuned"
    run = spikelm("train", "--model", trained, "--corpus", corpus_b, "--output", output, "--max-steps", 30,
                  "--block-size", 32, "--batch-size", 8, "--max-eval-blocks", 8, "--eval-steps", 1000)
    assert run.returncode == 0, run.stderr[-3000:]
    evaluations = [entry for entry in log_history(output) if "eval_loss" in entry]
    first, last = evaluations[0], evaluations[-1]
    assert first["step"] == 0 and last["step"] == 30

    # the reference: the saved model's loss on the same held-out blocks of the second corpus
    model = AutoModelForCausalLM.from_pretrained(trained).eval()
    tokenizer = AutoTokenizer.from_pretrained(trained)
    blocks = prepare_blocks(load_corpus(corpus_b), tokenizer, block_size=32, max_held_out_blocks=8)
    ids = torch.tensor(blocks.held_out["input_ids"])
    with torch.no_grad():
        saved_loss = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
        fresh = AutoModelForCausalLM.from_config(model.config).eval()
        fresh_loss = fresh(input_ids=ids, labels=ids, use_cache=False).loss.item()
    assert first["eval_loss"] == pytest.approx(saved_loss, rel=1e-4)
    assert abs(first["eval_loss"] - fresh_loss) > 0.2  # not a new model
    assert last["eval_loss"] < first["eval_loss"] - 0.02  # and it learned the second corpus


def _complete(checkpoint):
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return all((checkpoint / name).exists() for name in CHECKPOINT_FILES) and \
        state["global_step"] == int(checkpoint.name.split("-")[1])


def test_resume_after_sigkill_ends_like_an_uninterrupted_run(corpus_a, tmp_path):
    steps = ["--max-steps", 120, "--save-steps", 10, "--save-total-limit", 3]
    whole = tmp_path / "whole"
    assert spikelm_process("train", "--corpus", corpus_a, "--output", whole, *steps, *TINY).returncode == 0

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "spikelm.cli", "train", "--corpus", str(corpus_a), "--output",
                                str(killed), *map(str, steps), *TINY], env=ENV, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoint-20").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "results.json").exists(), "the run finished before it was killed"
    checkpoints = sorted(killed.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints and all(_complete(c) for c in checkpoints)  # never a half-written checkpoint-N
    last = checkpoints[-1]
    # a checkpoint being written when the process died stays aside, where --resume does not look
    staged = killed / ".staging" / "checkpoint-999"
    staged.mkdir(parents=True, exist_ok=True)
    (staged / "model.safetensors").write_bytes(b"half")

    run = spikelm_process("train", "--corpus", corpus_a, "--output", killed, *steps, *TINY, "--resume")
    assert run.returncode == 0, run.stderr[-3000:]
    summary = results(killed)
    assert summary["resumed_from"] == str(last)
    assert summary["global_step"] == results(whole)["global_step"] == 120
    resumed, uninterrupted = load_file(killed / "model.safetensors"), load_file(whole / "model.safetensors")
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6)


RANK_REPORT = textwrap.dedent("""
    import hashlib, json, sys
    from pathlib import Path
    import torch.distributed as dist
    from transformers import TrainerCallback
    from spikelm.training import TrainingOptions, build_config, prepare_data, train

    class RankReport(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            weights = b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())
            report = {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "step": state.global_step,
                      "weights": hashlib.sha256(weights).hexdigest()}
            Path(sys.argv[1], f"rank-{dist.get_rank()}.json").write_text(json.dumps(report))

    # the library's entry points, as a user's own training script calls them
    corpus, output, steps = sys.argv[2:5]
    options = TrainingOptions(output=output, corpus=corpus, max_steps=int(steps), block_size=32, batch_size=8,
                              max_eval_blocks=8, logging_steps=10, eval_steps=1000)
    data = prepare_data(options, vocab_size=384)
    train(build_config("tiny", data.tokenizer), data, options, callbacks=[RankReport()])
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_under_accelerate_launch(corpus_a, tmp_path):
    script = tmp_path / "train_with_rank_report.py"
    script.write_text(RANK_REPORT)
    reports = tmp_path / "reports"
    reports.mkdir()
    accelerate = Path(sys.executable).parent / "accelerate"
    run = subprocess.run([str(accelerate), "launch", "--config_file", str(REPO / "train/accelerate/cpu_ddp.yaml"),
                          "--num_cpu_threads_per_process", "1", "--main_process_port", str(_free_port()),
                          str(script), str(reports), str(corpus_a), str(tmp_path / "out"), "6"], capture_output=True, text=True, env=ENV, timeout=300,
                         cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads(p.read_text()) for p in sorted(reports.glob("rank-*.json"))]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["step"] == 6 for r in ranks)
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert results(tmp_path / "out")["world_size"] == 2


def _bad_input(tmp_path, case):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_text(3000), encoding="utf-8")
    args = ["--corpus", corpus, "--output", tmp_path / "out", *TINY, "--max-steps", 2]
    if case == "missing corpus":
        args[1] = tmp_path / "nowhere.txt"
    elif case == "empty corpus":
        corpus.write_bytes(b"")
    elif case == "binary file":
        corpus.write_bytes(bytes(range(256)) * 16)
    elif case == "invalid UTF-8":
        corpus.write_bytes("héllo wörld\n".encode("latin-1") * 100)
    elif case == "block size larger than the corpus":
        args += ["--block-size", 100_000]
    elif case == "vocabulary too large":
        args += ["--vocab-size", 100_000]
    elif case == "unknown preset":
        args += ["--preset", "gigantic"]
    return args


@pytest.mark.parametrize("case, message", [
    ("missing corpus", "corpus not found: .*pass --corpus"),
    ("empty corpus", "is empty: give"),
    ("binary file", "binary file .*give a UTF-8 text corpus"),
    ("invalid UTF-8", "not valid UTF-8 .*convert it to UTF-8"),
    ("block size larger than the corpus", "--block-size 100000 is larger than .*use a smaller --block-size"),
    ("vocabulary too large", "vocabulary size 100000 is too large .*pass a smaller --vocab-size"),
    ("unknown preset", "unknown preset 'gigantic': choose one of tiny, small"),
])
def test_bad_input_gets_one_line_and_no_traceback(tmp_path, case, message):
    run = spikelm("train", *_bad_input(tmp_path, case))
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert "Traceback" not in run.stderr
    assert lines[0].startswith("spikelm train: error: ")
    assert re.search(message, lines[0]), lines[0]


def test_freed_memory_is_kept_unless_asked_not_to(tmp_path):
    from spikelm.cli import build_parser
    from spikelm.cli.train import training_options

    parse = build_parser(only="train").parse_args
    assert training_options(parse(["train", "--output", str(tmp_path)])).keep_freed_memory is True
    options = training_options(parse(["train", "--output", str(tmp_path), "--no-keep-freed-memory"]))
    assert options.keep_freed_memory is False
