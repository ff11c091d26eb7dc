"""`spikelm generate`: text and energy per token from a saved model (a random tiny one: what is tested is the
command, not what the model learned)."""

import json
import re

import pytest
from helpers import save_tiny_model, spikelm


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"))


def test_generate_prints_text_and_energy_per_token(model_dir):
    run = spikelm("generate", "--model", model_dir, "--prompt", "ROMEO:", "--max-new-tokens", 20)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("ROMEO:")
    energy = re.search(r"energy: (\d+) pJ/token \((\d+) ACs \+ (\d+) MACs per token, firing rate ([\d.]+)\); "
                       r"same-shape GPT-2: (\d+) pJ/token", run.stdout)
    assert energy, run.stdout
    pj, ac, mac, rate, gpt2 = (float(x) for x in energy.groups())
    assert pj == pytest.approx(0.9 * ac + 4.6 * mac, rel=0.01) and pj > 0 and 0 < rate < 1 and gpt2 > 0
    memory = re.search(r"spikelm fp32 (\d+) \+ (\d+) = (\d+); same-shape GPT-2, fp32 (\d+) \+ (\d+) = (\d+) "
                       r"\((\d+) ACs \+ (\d+) MACs\); same-shape GPT-2, int8 \d+ \+ \d+ = \d+ .*; ANN twin fp32 ",
                       run.stdout)
    assert memory, run.stdout
    compute, mem, total, gpt2_compute, gpt2_mem, gpt2_total, _, _ = (int(x) for x in memory.groups())
    assert compute == pytest.approx(pj, abs=1) and mem > 0 and total == pytest.approx(compute + mem, abs=1)
    assert gpt2_compute == pytest.approx(gpt2, abs=1) and gpt2_total == pytest.approx(gpt2_compute + gpt2_mem, abs=1)


def test_generate_json_counts_every_token(model_dir):
    run = spikelm("generate", "--model", model_dir, "--prompt", "KING:", "--max-new-tokens", 12, "--greedy",
                  "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["text"].startswith("KING:")
    # the prompt's tokens, then every generated token but the last is fed back: prompt + 11 tokens
    assert result["energy"]["tokens"] >= 12
    assert result["energy"]["pj_per_token"] > 0


def test_generate_without_a_model_is_one_line(tmp_path):
    run = spikelm("generate", "--model", tmp_path / "nothing", "--prompt", "hi")
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "no saved model in" in run.stderr
