"""The serving engine without HTTP: exact per-row energy, text streaming, sampling."""

import copy

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import tiny_config
from spikelm import SpikeLMForCausalLM, count_energy
from spikelm.energy import EnergyCounter
from spikelm.serving.engine import SamplingParams, TextStream, sample_next


@pytest.mark.parametrize("attention_type", ["ssa", "sdsa"])
def test_row_counts_in_a_batched_step_equal_each_sequence_counted_alone(attention_type):
    model = SpikeLMForCausalLM(tiny_config(attention_type, hidden_size=64, num_attention_heads=4)).double().eval()
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [20]]
    with torch.inference_mode():
        caches = [model(input_ids=torch.tensor([p]), use_cache=True).cache for p in prompts]
        next_ids = [[8], [14], [21]]
        alone = []
        for cache, token in zip(caches, next_ids):
            with count_energy(model) as counter:
                single = model(input_ids=torch.tensor([token]), cache=copy.deepcopy(cache), use_cache=True)
            alone.append((counter, single.logits[0, -1]))
        batched_cache = caches[0]
        for cache in caches[1:]:
            batched_cache.append_rows(cache)
        rows = EnergyCounter(positions=[len(p) for p in prompts])
        with count_energy(model, rows):
            batched = model(input_ids=torch.tensor(next_ids), cache=batched_cache, use_cache=True)
    for i, (counter, logits) in enumerate(alone):
        row = rows.row(i)
        assert (row.ac, row.mac) == (sum(counter.ac.values()), sum(counter.mac.values()))
        assert (row.spikes, row.neuron_steps) == (sum(counter.spikes.values()), sum(counter.neuron_steps.values()))
        assert (row.tokens, row.logits, row.context) == (1, 1, len(prompts[i]) + 1)
        alone_total = counter.total()
        assert (row.weight_reads, row.state_reads, row.state_writes, row.spike_reads, row.spike_writes) == (
            alone_total.weight_reads, alone_total.state_reads, alone_total.state_writes, alone_total.spike_reads,
            alone_total.spike_writes)
        # float64: the same numbers alone and in the batch, bit for bit
        assert torch.equal(batched.logits[i, -1], logits)
    assert rows.row(0).ac != rows.row(1).ac  # the counts really are per row


def _byte_tokenizer():
    """Every UTF-8 byte is a token: a multi-byte character arrives in pieces."""
    byte_to_unicode = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_to_unicode))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _metaspace_tokenizer():
    """Words with SentencePiece's leading-space marker, which decoding one token alone drops."""
    vocab = {"<unk>": 0, "▁to": 1, "▁be": 2, "▁or": 3, "▁not": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_text_stream_never_splits_a_character():
    tokenizer = _byte_tokenizer()
    text = "é to €, or 😀!"
    stream = TextStream(tokenizer, [])
    deltas = [stream.push(i)[0] for i in tokenizer(text)["input_ids"]]
    assert len(deltas) == len(text.encode("utf-8"))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + stream.flush() == text


def test_text_stream_keeps_leading_spaces():
    tokenizer = _metaspace_tokenizer()
    stream = TextStream(tokenizer, [])
    deltas = [stream.push(i)[0] for i in tokenizer("to be or not")["input_ids"]]
    assert deltas == ["to", " be", " or", " not"]


def test_text_stream_holds_back_a_possible_stop_and_cuts_at_it():
    tokenizer = _byte_tokenizer()
    stream = TextStream(tokenizer, ["END"])
    sent = []
    for i in tokenizer("abcENxEND tail")["input_ids"]:
        delta, stopped = stream.push(i)
        sent.append("".join(sent[-1:]) + delta)
        if stopped:
            break
    assert sent[:6] == ["a", "ab", "abc", "abc", "abc", "abcENx"]  # "E", "EN" wait: they may begin "END"
    assert sent[-1] == "abcENx" and stopped and stream.sent_text == "abcENx"


def test_sampling():
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0], dtype=torch.float64)
    assert sample_next(logits, SamplingParams(temperature=0), None) == 1
    assert sample_next(logits, SamplingParams(temperature=1.0, top_k=1), None) == 1
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, SamplingParams(temperature=1.0, top_p=0.01), g) == 1
    draws = [sample_next(logits, SamplingParams(top_k=2), torch.Generator().manual_seed(s)) for s in range(40)]
    assert set(draws) == {1, 2}  # top-k 2 keeps only the two best
    again = [sample_next(logits, SamplingParams(top_k=2), torch.Generator().manual_seed(s)) for s in range(40)]
    assert draws == again


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_vanishing_top_p_keeps_the_most_likely_token(dtype):
    # in float32 the first token's "probability before it" rounds above 5e-324: all were dropped, and
    # multinomial raised (a 500 that the schema fuzz run found)
    logits = torch.randn(50, dtype=dtype, generator=torch.Generator().manual_seed(1))
    for seed in range(5):
        assert sample_next(logits, SamplingParams(top_p=5e-324), torch.Generator().manual_seed(seed)) == \
            int(torch.argmax(logits))
