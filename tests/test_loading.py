"""spikelm.loading: local directories and hub ids, resolved as from_pretrained resolves them.

The hub tests lay a real Hugging Face cache tree (models--ORG--NAME/refs/..., snapshots/<commit>/...) in a
temporary HF_HOME and run the commands with HF_HUB_OFFLINE=1: huggingface_hub's own resolution code runs, and
nothing is downloaded. They run in a fresh interpreter because huggingface_hub reads HF_HOME when imported.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import shakespeare_text
from helpers import save_tiny_model

from spikelm.errors import SpikeLMError
from spikelm.loading import load_model_and_tokenizer, require_saved_model

MAIN, V2 = "a" * 40, "b" * 40  # two commits of one repository


def hub_cache(home):
    """HF_HOME with acme/tiny at two commits: main -> MAIN (seed 0), tag v2 -> V2 (seed 1)."""
    repo = home / "hub" / "models--acme--tiny"
    for commit, seed in ((MAIN, 0), (V2, 1)):
        save_tiny_model(repo / "snapshots" / commit, seed=seed)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v2").write_text(V2)
    return home


SCRIPT = textwrap.dedent("""
    import contextlib, io, json, sys
    from spikelm.cli import main

    results = {}
    for name, argv in json.loads(sys.argv[1]).items():
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        results[name] = {"code": code, "out": out.getvalue(), "err": err.getvalue()}
    print(json.dumps(results))
""")


def test_hub_ids_resolve_from_the_cache_offline(tmp_path):
    home = hub_cache(tmp_path / "hf")
    data = tmp_path / "text.txt"
    data.write_text(shakespeare_text(600), encoding="utf-8")
    ppl = ["eval", "perplexity", "--data", str(data), "--json", "--model", "acme/tiny"]
    runs = {
        "main": ppl,
        "v2": ppl + ["--revision", "v2"],
        "commit": ppl + ["--revision", V2],
        "generate": ["generate", "--model", "acme/tiny", "--prompt", "ROMEO:", "--max-new-tokens", "4", "--greedy",
                     "--json"],
        "missing": ["generate", "--model", "acme/missing", "--prompt", "hi"],
        "missing revision": ppl + ["--revision", "v3"],
    }
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(runs)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    nats = {}
    for name in ("main", "v2", "commit"):
        assert results[name]["code"] == 0, results[name]["err"]
        nats[name] = json.loads(results[name]["out"].strip().splitlines()[-1])["total_nats"]
    assert nats["v2"] == nats["commit"]  # a tag and its commit are the same snapshot
    assert nats["main"] != nats["v2"]  # another snapshot: other weights
    generated = json.loads(results["generate"]["out"].strip().splitlines()[-1])
    assert generated["text"].startswith("ROMEO:") and generated["energy"]["pj_per_token"] > 0
    for name in ("missing", "missing revision"):
        assert results[name]["code"] == 2
        error = results[name]["err"].strip()
        assert error.count("\n") == 0 and "Traceback" not in error
        assert "not in the Hugging Face cache" in error and "HF_HUB_OFFLINE=1" in error, error
    assert "acme/missing" in results["missing"]["err"] and "'v3'" in results["missing revision"]["err"]


def test_a_local_directory_loads_and_a_bad_one_is_refused(tmp_path):
    model, tokenizer = load_model_and_tokenizer(save_tiny_model(tmp_path / "model"))
    assert model.config.model_type == "spikelm" and not model.training and len(tokenizer) == model.config.vocab_size
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpikeLMError, match="no saved model in .*empty: pass --teacher a directory"):
        require_saved_model(tmp_path / "empty", "--teacher")
    with pytest.raises(SpikeLMError, match="--revision only applies to hub ids"):
        require_saved_model(tmp_path / "model", revision="main")
    # a relative name that is no directory is tried as a hub id; offline, the message says so
    with pytest.raises(SpikeLMError, match="no saved model in runs/nothing: .*HF_HUB_OFFLINE=1"):
        require_saved_model("runs/nothing")
