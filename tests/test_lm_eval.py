"""lm-evaluation-harness evaluates a saved spikelm directory offline on the local tasks in eval/tasks, with
the documented command, and its bits per byte agrees with `spikelm eval perplexity` on the same passages.

Needs the `eval` extra (lm-eval); skipped without it.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from spikelm.evaluation import perplexity
from spikelm.loading import load_model_and_tokenizer
from conftest import REPO
from helpers import save_tiny_model

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'spikelm[eval]')")

LIMIT = 3  # documents per task: the first three of each file


def test_lm_eval_runs_offline_on_local_tasks(tmp_path):
    save_tiny_model(tmp_path / "model")
    command = [sys.executable, "-m", "lm_eval", "--model", "hf",
               "--model_args", f"pretrained={tmp_path / 'model'},trust_remote_code=True",
               "--include_path", "eval/tasks", "--tasks", "shakespeare_heldout,shakespeare_next_line",
               "--device", "cpu", "--batch_size", "4", "--limit", str(LIMIT), "--output_path", str(tmp_path / "out")]
    # offline: no Hub, no network; the HF module cache in tmp so that the model's copied code is fresh
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "modules"), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]

    heldout = results["shakespeare_heldout"]
    for metric in ("bits_per_byte", "byte_perplexity", "word_perplexity"):
        assert math.isfinite(heldout[f"{metric},none"]) and heldout[f"{metric},none"] > 0
    choice = results["shakespeare_next_line"]
    assert 0 <= choice["acc,none"] <= 1 and 0 <= choice["acc_norm,none"] <= 1

    # the same passages through spikelm's own evaluation: bits per byte over the three, summed nats / bytes
    model, tokenizer = load_model_and_tokenizer(tmp_path / "model")
    docs = [json.loads(line)["text"] for line in
            (REPO / "eval/tasks/data/shakespeare_heldout.jsonl").read_text().splitlines()[:LIMIT]]
    with torch.no_grad():
        ours = [perplexity(model, tokenizer, doc) for doc in docs]
    bits_per_byte = sum(r["total_nats"] for r in ours) / math.log(2) / sum(r["text_bytes"] for r in ours)
    assert heldout["bits_per_byte,none"] == pytest.approx(bits_per_byte, rel=1e-3)
