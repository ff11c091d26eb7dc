"""spikelm.evaluation: perplexity and bits per byte against hand computations, the recurrent (chunked)
evaluation against one parallel pass, the sliding window against a per-token restatement, and the energy
report against the model's own counters."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from spikelm import SpikeLMForCausalLM, energy_report
from spikelm.cli import main
from spikelm.evaluation import encode, energy_evaluation, perplexity, recurrent_nll, sliding_window_nll
from conftest import make_char_tokenizer, shakespeare_text, tiny_config
from helpers import save_tiny_model, spikelm

TEXT = shakespeare_text(2000)[:400]


@pytest.fixture(scope="module")
def tokenizer():
    return make_char_tokenizer(shakespeare_text())


def spikelm64(tokenizer, attention_type="ssa"):
    torch.manual_seed(0)
    return SpikeLMForCausalLM(tiny_config(attention_type, vocab_size=len(tokenizer))).double().eval()


def hand_nats(model, ids):
    """Summed cross-entropy of ids[1:] from one parallel pass over the whole sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=False).logits[0]
    return F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()


def test_perplexity_is_exp_of_the_mean_cross_entropy_and_bits_per_byte_counts_bytes(tokenizer):
    model = spikelm64(tokenizer)
    text = TEXT[:200] + " café, naïve – ñ"  # characters of 2 and 3 bytes: bytes != characters
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    nats = hand_nats(model, ids)
    result = perplexity(model, tokenizer, text, chunk=50)
    assert result["mode"] == "recurrent" and result["first_token_predicted"]
    assert result["predicted_tokens"] == len(ids) - 1  # every token of the text, the first one included
    assert result["perplexity"] == pytest.approx(math.exp(nats / (len(ids) - 1)), rel=1e-6)
    text_bytes = len(text.encode("utf-8"))
    assert result["text_bytes"] == text_bytes > len(text)
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / text_bytes, rel=1e-6)


@pytest.mark.parametrize("attention_type", ["ssa", "sdsa"])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_recurrent_evaluation_equals_one_parallel_pass(tokenizer, attention_type, chunk):
    # chunk 1 runs the recurrent one-token form after the first token; 7 and 64 the parallel form from a state
    model = spikelm64(tokenizer, attention_type)
    ids, _ = encode(tokenizer, TEXT[:150])
    nats, predicted = recurrent_nll(model, ids, chunk)
    assert predicted == len(ids) - 1
    assert abs(nats - hand_nats(model, ids)) / predicted < 1e-4


def test_sliding_window_matches_a_per_token_restatement(tokenizer):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=16,
                                      bos_token_id=1, eos_token_id=2)).double().eval()
    ids, _ = encode(tokenizer, TEXT[:60])
    max_length, stride = 16, 5
    nats, predicted = sliding_window_nll(gpt2, ids, max_length, stride)
    # token p is scored by the window that ends at the first of 16, 21, 26, ... (capped at the end) past p,
    # with that window's tokens before it as context
    ends = list(range(max_length, len(ids), stride)) + [len(ids)]
    expected = 0.0
    for p in range(1, len(ids)):
        end = next(e for e in ends if e > p)
        context = ids[max(0, end - max_length):p + 1]
        with torch.no_grad():
            logits = gpt2(torch.tensor([context])).logits[0, -2]
        expected -= torch.log_softmax(logits, -1)[ids[p]].item()
    assert predicted == len(ids) - 1
    assert nats == pytest.approx(expected, rel=1e-9)
    # a window wider than the text is one pass
    short = ids[:16]
    assert sliding_window_nll(gpt2, short, 16, 8)[0] == pytest.approx(hand_nats(gpt2, short), rel=1e-9)
    result = perplexity(gpt2, tokenizer, TEXT[:60], stride=5)  # auto: a window for a non-spikelm model
    assert result["mode"] == "window" and result["max_length"] == 16
    assert result["total_nats"] == pytest.approx(expected, rel=1e-9)


def test_perplexity_command_writes_json(tmp_path, capsys):
    save_tiny_model(tmp_path / "model")
    data = tmp_path / "held_out.txt"
    data.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "ppl.json"
    assert main(["eval", "perplexity", "--model", str(tmp_path / "model"), "--data", str(data), "--json",
                 "--output", str(out), "--chunk", "64"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = json.loads(out.read_text())
    assert printed == written
    assert written["mode"] == "recurrent" and written["text_bytes"] == len(TEXT.encode("utf-8"))
    assert math.isfinite(written["bits_per_byte"]) and written["perplexity"] > 1
    # a missing file is one line of error, exit code 2
    assert main(["eval", "perplexity", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "no")]) == 2
    assert "no text file" in capsys.readouterr().err


def test_energy_report_totals_equal_its_rows_and_the_models_own_counters(tokenizer):
    model = spikelm64(tokenizer)
    text = shakespeare_text(2000)
    report = energy_evaluation(model, tokenizer, text, tokens=300, chunk=64)  # 5 chunks, the state carried
    tokens = report["tokens"]
    assert tokens == 300
    for field, key in (("ac_per_token", "ac"), ("mac_per_token", "mac"), ("pj_per_token", "pj")):
        assert sum(row[key] for row in report["rows"]) == pytest.approx(report[field], rel=1e-12)
    assert report["totals"]["ac"] == pytest.approx(report["ac_per_token"] * tokens, rel=1e-12)
    assert sum(report["spikes_per_token_per_layer"].values()) == pytest.approx(report["spikes_per_token"])
    # the model's own counters, over one parallel pass of the same tokens (spikelm.energy.energy_report)
    ids = torch.tensor(encode(tokenizer, text)[0][:300])
    reference = energy_report(model, ids)
    assert report["totals"] == reference["totals"]
    assert report["ann_pj_per_token"] == pytest.approx(reference["ann_pj_per_token"], rel=1e-12)
    assert report["firing_rate_per_layer"] == pytest.approx(reference["firing_rate_per_layer"], rel=1e-12)
    # the same-shape GPT-2's per-layer figures add up to its total
    assert sum(v["mac"] for v in report["ann_per_layer"].values()) == pytest.approx(report["ann_mac_per_token"])


def test_energy_command_writes_json_markdown_and_png(tmp_path):
    save_tiny_model(tmp_path / "model")
    data = tmp_path / "held_out.txt"
    data.write_text(shakespeare_text(3000), encoding="utf-8")
    out = tmp_path / "report" / "energy.json"
    done = spikelm("eval", "energy", "--model", tmp_path / "model", "--data", data, "--tokens", 256,
                   "--e-ac", 1.0, "--e-mac", 5.0, "--output", out)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["e_ac_pj"] == 1.0 and report["e_mac_pj"] == 5.0 and report["tokens"] == 256
    assert report["pj_per_token"] == pytest.approx(1.0 * report["ac_per_token"] + 5.0 * report["mac_per_token"])
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    markdown = out.with_suffix(".md").read_text()
    assert "| layers.1 |" in markdown and "pJ per token" in markdown
