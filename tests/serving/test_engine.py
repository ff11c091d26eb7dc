"""The serving engine without HTTP: exact per-row energy, text streaming, sampling."""

import copy
import random
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import shakespeare_text, tiny_config
from spikelm import SpikeLMForCausalLM, count_energy
from spikelm.energy import EnergyCounter, EnergyCounts, gpt2_reference_counts
from spikelm.serving.engine import Detokenizer, Engine, SamplingParams, TextStream, sample_next
from spikelm.tokenizer import train_tokenizer


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
    stream = TextStream(Detokenizer(tokenizer), [])
    deltas = [stream.push(i)[0] for i in tokenizer(text)["input_ids"]]
    assert len(deltas) == len(text.encode("utf-8"))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + stream.flush() == text


def test_text_stream_keeps_leading_spaces():
    tokenizer = _metaspace_tokenizer()
    stream = TextStream(Detokenizer(tokenizer), [])
    deltas = [stream.push(i)[0] for i in tokenizer("to be or not")["input_ids"]]
    assert deltas == ["to", " be", " or", " not"]


def test_text_stream_holds_back_a_possible_stop_and_cuts_at_it():
    tokenizer = _byte_tokenizer()
    stream = TextStream(Detokenizer(tokenizer), ["END"])
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


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory):
    """spikelm's own kind of tokenizer: SentencePiece pieces, and byte tokens for characters it never saw."""
    return train_tokenizer([shakespeare_text(20_000)], tmp_path_factory.mktemp("tokenizer"), vocab_size=384)


def _id_sequences(tokenizer):
    """Stretches of the bundled corpus and of unseen characters, and random ids: runs of byte tokens that are
    not UTF-8, special tokens between them, anything."""
    corpus = shakespeare_text(None)
    texts = [corpus[start:start + 1200] for start in range(0, len(corpus) - 1200, len(corpus) // 16)]
    texts.append("unseen: Ωmega, 漢字, 😀, café, €100 " * 8)
    sequences = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    rng = random.Random(0)
    vocab = range(len(tokenizer))
    odd = [i for i in vocab if i not in Detokenizer(tokenizer).piece_ends]  # bytes and specials
    sequences += [[rng.choice(vocab) for _ in range(200)] for _ in range(10)]
    sequences += [[rng.choice(odd if rng.random() < 0.8 else vocab) for _ in range(200)] for _ in range(10)]
    return sequences


@pytest.mark.parametrize("kind", ["sentencepiece", "characters"])
def test_text_stream_text_is_all_ids_decoded_together_at_every_token(kind, sentencepiece_tokenizer, char_tokenizer):
    tokenizer = sentencepiece_tokenizer if kind == "sentencepiece" else char_tokenizer
    detokenizer = Detokenizer(tokenizer)
    assert detokenizer.piece_ends  # this decoder's text is built a piece at a time, not from all ids every time
    for ids in _id_sequences(tokenizer):
        stream = TextStream(detokenizer, [])
        for n, token_id in enumerate(ids, 1):
            stream.push(token_id)
            assert stream.text == tokenizer.decode(ids[:n], skip_special_tokens=True)


def test_decoders_that_look_across_tokens_decode_every_id():
    assert not Detokenizer(_byte_tokenizer()).piece_ends
    assert not Detokenizer(_metaspace_tokenizer()).piece_ends


def test_batched_greedy_tokens_are_each_rows_own_argmax():
    logits = torch.randint(0, 3, (6, 1, 10), generator=torch.Generator().manual_seed(0)).float()  # many ties
    params = [SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(temperature=0),
              SamplingParams(temperature=1.0), SamplingParams(temperature=0, logit_bias={3: 5.0}),
              SamplingParams(temperature=0)]
    batch = [SimpleNamespace(params=p) for p in params]
    tokens = Engine._greedy_tokens(batch, logits)
    assert sorted(tokens) == [0, 1, 2, 5]  # sampled rows and biased rows are sampled one by one
    assert tokens == {row: sample_next(logits[row, -1], params[row], None) for row in tokens}


def test_gpt2_reference_energy_is_the_reference_counts_priced(char_tokenizer):
    engine = Engine(SpikeLMForCausalLM(tiny_config()), char_tokenizer)
    for tokens, logits, context in [(1, 1, 7), (1, 1, 8), (1, 1, 7), (5, 1, 15), (5, 5, 15), (5, 1, 25)]:
        reference = gpt2_reference_counts(engine.config, tokens, logits=logits, context=context)["counts"]
        energy = EnergyCounts(tokens=tokens, logits=logits, context=context)
        assert engine._gpt2_pj(energy) == engine.prices.compute_pj(reference)
