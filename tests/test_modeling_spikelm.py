import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer, pipeline

from spikelm import SpikeLMCache, SpikeLMConfig, SpikeLMForCausalLM
from spikelm.energy import count_inference
from spikelm.modeling_spikelm import ATTENTION_BLOCK, sdsa_parallel, sdsa_recurrent, ssa_parallel, ssa_recurrent
from conftest import REPO, tiny_config

KINDS = ["ssa", "sdsa"]


def tiny_model(kind="ssa", dtype=torch.float32, **overrides):
    model = SpikeLMForCausalLM(tiny_config(kind, **overrides)).to(dtype).eval()
    return model


# ---------------------------------------------------------------- spike-driven


@pytest.mark.parametrize("kind", KINDS)
def test_every_weight_matrix_receives_only_spikes(kind):
    # Every weight matrix receives spikes (0 or 1); the head receives the per-token count of its input spikes.
    model = tiny_model(kind)
    seen, output_spikes, head_inputs = [], [], []

    def check(module, inputs, output):
        seen.append(bool(((inputs[0] == 0) | (inputs[0] == 1)).all()))
        seen.append(bool((inputs[0] == 1).any()))  # spikes did flow

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 5 * model.config.num_hidden_layers + 1  # q, kv, o, fc_in, fc_out; head
    for m in linears:
        if m is not model.lm_head:
            m.register_forward_hook(check)
    model.model.output_neuron.register_forward_hook(lambda m, i, o: output_spikes.append(o))
    model.lm_head.register_forward_hook(lambda m, i, o: head_inputs.append(i[0]))
    ids = torch.randint(0, 48, (2, 12))
    model(ids, use_cache=False)
    out = model(ids[:, :6])  # prefill, then one recurrent step
    model(ids[:, 6:7], cache=out.cache)
    assert len(seen) >= 2 * 3 * (len(linears) - 1)  # every matrix at every forward
    assert all(seen[0::2]), "a weight matrix received a value that is not 0 or 1"
    assert sum(seen[1::2]) >= len(linears) - 1, "too few spikes flowed for the check to mean anything"
    assert len(head_inputs) == len(output_spikes) == 3
    for spikes, counts in zip(output_spikes, head_inputs):
        assert ((spikes == 0) | (spikes == 1)).all()
        assert torch.equal(counts, spikes.sum(0, keepdim=True))  # the count of each neuron's spikes, 0..T
        assert counts.max() > 1, "no neuron fired twice: the count check would mean nothing"


# ---------------------------------------------------------------- parallel == recurrent


def random_spikes(*shape, rate=0.3):
    return (torch.rand(*shape) < rate).float()


@pytest.mark.parametrize("n", [1, 5, 33, 300])
def test_ssa_parallel_equals_recurrent(n):
    T, B, H, d = 2, 2, 3, 8
    q, k, v = (random_spikes(T, B, H, n, d) for _ in range(3))
    decay = torch.tensor([0.5, 0.9, 1.0])
    mask = torch.ones(B, n)
    zero = (torch.zeros(T, B, H, d, d), torch.zeros(B, H))
    log_decay = torch.log(decay)[None, :, None].expand(1, H, n)
    parallel, (S_par, z_par) = ssa_parallel(q, k, v, log_decay, 0.25, mask, zero)
    state, outs = zero, []
    for i in range(n):
        out, state = ssa_recurrent(q[..., i, :], k[..., i, :], v[..., i, :], decay, 0.25, mask[:, i], state)
        outs.append(out)
    recurrent = torch.stack(outs, dim=-2)
    assert (parallel - recurrent).abs().max() <= 1e-5
    assert (S_par - state[0]).abs().max() <= 1e-4 * max(1.0, state[0].abs().max())
    # two chunks continuing from the carried state give the same read-out as one
    if n > 2:
        half = n // 2
        first, carried = ssa_parallel(q[..., :half, :], k[..., :half, :], v[..., :half, :],
                                      log_decay[..., :half], 0.25, mask[:, :half], zero)
        second, _ = ssa_parallel(q[..., half:, :], k[..., half:, :], v[..., half:, :], log_decay[..., half:], 0.25,
                                 mask[:, half:], carried)
        assert (torch.cat([first, second], -2) - parallel).abs().max() <= 1e-5


@pytest.mark.parametrize("n", [1, 5, 33, 300])
def test_sdsa_parallel_equals_recurrent(n):
    T, B, H, d = 2, 2, 3, 8
    k, v = random_spikes(T, B, H, n, d), random_spikes(T, B, H, n, d)
    decay = torch.tensor([0.5, 0.9, 1.0])
    mask = torch.ones(B, n)
    zero = (torch.zeros(T, B, H, d), torch.zeros(B, H))
    parallel, _ = sdsa_parallel(k, v, torch.log(decay)[None, :, None].expand(1, H, n), mask, zero)
    state, outs = zero, []
    for i in range(n):
        out, state = sdsa_recurrent(k[..., i, :], v[..., i, :], decay, mask[:, i], state)
        outs.append(out)
    assert (parallel - torch.stack(outs, dim=-2)).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 7, 40])
def test_gated_decay_parallel_equals_recurrent_in_float64(kind, n):
    """Per-token decays g_i (some near 0, some near 1): the parallel form through cumulative log-decays, in one
    chunk or two with the state carried, equals S_i = g_i S_{i-1} + k_i v_i^T, z_i = g_i z_{i-1} + m_i."""
    torch.manual_seed(n)
    T, B, H, d = 2, 3, 2, 4
    q, k, v = (random_spikes(T, B, H, n, d).double() for _ in range(3))
    mask = torch.ones(B, n, dtype=torch.float64)
    mask[0, : n // 2] = 0  # a left-padded row
    k, v = k * mask[None, :, None, :, None], v * mask[None, :, None, :, None]
    log_decay = torch.nn.functional.logsigmoid(4 * torch.randn(B, H, n, dtype=torch.float64))
    state_shape = (T, B, H, d, d) if kind == "ssa" else (T, B, H, d)
    zero = (torch.zeros(state_shape, dtype=torch.float64), torch.zeros(B, H, dtype=torch.float64))
    if kind == "ssa":
        parallel = lambda i, j, state: ssa_parallel(q[..., i:j, :], k[..., i:j, :], v[..., i:j, :],  # noqa: E731
                                                    log_decay[..., i:j], 0.5, mask[:, i:j], state)
        step = lambda i, state: ssa_recurrent(q[..., i, :], k[..., i, :], v[..., i, :],  # noqa: E731
                                              torch.exp(log_decay[..., i]), 0.5, mask[:, i], state)
    else:
        parallel = lambda i, j, state: sdsa_parallel(k[..., i:j, :], v[..., i:j, :], log_decay[..., i:j],  # noqa: E731
                                                     mask[:, i:j], state)
        step = lambda i, state: sdsa_recurrent(k[..., i, :], v[..., i, :], torch.exp(log_decay[..., i]),  # noqa: E731
                                               mask[:, i], state)
    whole, (S_whole, z_whole) = parallel(0, n, zero)
    state, outs = zero, []
    for i in range(n):
        out, state = step(i, state)
        outs.append(out)
    assert torch.allclose(whole, torch.stack(outs, dim=-2), rtol=1e-10, atol=1e-12)
    assert torch.allclose(S_whole, state[0], rtol=1e-10, atol=1e-12)
    assert torch.allclose(z_whole, state[1], rtol=1e-10, atol=1e-12)
    half = n // 2
    first, carried = parallel(0, half, zero) if half else (whole[..., :0, :], zero)
    second, (S_two, _) = parallel(half, n, carried)
    assert torch.allclose(torch.cat([first, second], -2), whole, rtol=1e-10, atol=1e-12)
    assert torch.allclose(S_two, S_whole, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_fixed_decay_is_a_gate_that_never_moves(kind):
    """The gate's bias starts at the logit of each head's fixed decay: with W_g zeroed, a gated model computes
    what the fixed-decay model computes."""
    fixed = tiny_model(kind, torch.float64)
    gated = tiny_model(kind, torch.float64, gated_decay=True)
    attention = gated.model.layers[0].attention
    assert attention.gate_proj.weight.shape == (2, 32) and 0.01 < attention.gate_proj.weight.std() < 0.03
    assert torch.allclose(torch.sigmoid(attention.decay_logit), torch.tensor(attention.fixed_decay, dtype=torch.float64))
    missing = gated.load_state_dict(fixed.state_dict(), strict=False).missing_keys
    assert sorted(missing) == sorted(f"model.layers.{i}.attention.{name}" for i in range(2)
                                     for name in ("decay_logit", "gate_proj.weight"))
    with torch.no_grad():
        for layer in gated.model.layers:
            layer.attention.gate_proj.weight.zero_()
            decay = torch.tensor(layer.attention.fixed_decay, dtype=torch.float64)
            layer.attention.decay_logit.copy_(torch.logit(decay))  # initialised in float32: exact here
    ids = torch.randint(0, 48, (2, 20))
    with torch.no_grad():
        assert torch.allclose(gated(ids, use_cache=False).logits, fixed(ids, use_cache=False).logits, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gated", [False, True])
def test_model_logits_parallel_equal_token_by_token_decoding(kind, gated):
    # float64: a rounding difference between the two forms could flip a spike sitting at its threshold
    model = tiny_model(kind, torch.float64, gated_decay=gated)
    if gated:  # gates that really move from token to token
        with torch.no_grad():
            for layer in model.model.layers:
                layer.attention.gate_proj.weight.normal_(0.0, 1.0)
    n = ATTENTION_BLOCK + 40  # the parallel form runs over two blocks, carrying the state between them
    ids = torch.randint(0, 48, (2, n))
    with torch.no_grad():
        parallel = model(ids, use_cache=False).logits
        cache, steps = None, []
        for i in range(ids.shape[1]):
            out = model(ids[:, i:i + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
        # a prefill of 25 tokens, then recurrent steps
        out = model(ids[:, :25], use_cache=True)
        mixed = [out.logits]
        for i in range(25, n):
            out = model(ids[:, i:i + 1], cache=out.cache)
            mixed.append(out.logits)
    assert isinstance(cache, SpikeLMCache) and cache.get_seq_length() == n
    assert (parallel - torch.cat(steps, 1)).abs().max() <= 1e-4
    assert (parallel - torch.cat(mixed, 1)).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gated", [False, True])
def test_causality(kind, gated):
    model = tiny_model(kind, gated_decay=gated)
    ids = torch.randint(0, 48, (1, 30))
    with torch.no_grad():
        base = model(ids, use_cache=False).logits
        for j in (0, 7, 29):
            changed = ids.clone()
            changed[0, j] = (changed[0, j] + 1) % 48
            logits = model(changed, use_cache=False).logits
            assert torch.equal(logits[:, :j], base[:, :j])
            if j == 0:
                assert not torch.equal(logits, base)


@pytest.mark.parametrize("gated", [False, True])
def test_recurrent_state_size_does_not_grow(gated):
    model = tiny_model("ssa", gated_decay=gated)
    with torch.no_grad():
        short = model(torch.randint(0, 48, (1, 10)), use_cache=True).cache
        short = model(torch.randint(0, 48, (1, 1)), cache=short).cache
        long = model(torch.randint(0, 48, (1, 1999)), use_cache=True).cache
        long = model(torch.randint(0, 48, (1, 1)), cache=long).cache
    assert short.get_seq_length() == 11 and long.get_seq_length() == 2000
    assert short.state_size_bytes() == long.state_size_bytes() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_cache_appends_and_selects_batch_rows(kind):
    """Rows prefilled alone, appended into one batch (different lengths), decode as they would alone;
    selecting rows keeps exactly those rows."""
    model = tiny_model(kind, torch.float64, gated_decay=True)
    prompts = [torch.randint(0, 48, (1, n)) for n in (5, 9, 2)]
    next_ids = torch.randint(0, 48, (3, 1))
    with torch.no_grad():
        caches = [model(p, use_cache=True).cache for p in prompts]
        alone = [model(next_ids[i:i + 1], cache=copy.deepcopy(c)).logits for i, c in enumerate(caches)]
        batch = caches[0]
        for cache in caches[1:]:
            assert batch.append_rows(cache) is batch
        assert batch.layers[0].decay_sum.shape[0] == 3 and batch.get_seq_length() == 9
        batched = model(next_ids, cache=batch).logits
        for i in range(3):
            assert torch.equal(batched[i:i + 1], alone[i])
        kept = batch.select_rows(torch.tensor([2, 0]))
        assert kept.layers[1].attention_state.shape[1] == 2
        after = model(torch.tensor([[3], [4]]), cache=kept).logits
        reference = model(torch.tensor([[4]]), cache=model(torch.cat([prompts[0], next_ids[:1]], 1)).cache).logits
    assert torch.allclose(after[1:], reference, atol=1e-10)


def test_relu_twin_is_the_same_architecture_without_spikes():
    from spikelm.references import relu_twin_config

    spiking = tiny_model("ssa", gated_decay=True)
    twin = SpikeLMForCausalLM(relu_twin_config(spiking.config)).eval()
    assert twin.config.neuron_type == "relu" and twin.config.time_steps == 1 and twin.config.gated_decay
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in spiking.state_dict().items()}
    seen = []
    for m in twin.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda mod, inputs, out: seen.append(inputs[0]))
    ids = torch.randint(0, 48, (2, 12))
    twin(ids, use_cache=False)
    values = torch.cat([x.flatten() for x in seen])
    assert values.min() >= 0 and values.max() <= 1  # rates in [0, 1] ...
    assert ((values > 0) & (values < 1)).float().mean() > 0.05  # ... and real-valued, not spikes
    with pytest.raises(Exception, match="time_steps: must be 1 for the relu ANN twin"):
        tiny_config(neuron_type="relu", time_steps=2)


def test_wrong_shapes_name_the_expected_one():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        model(torch.randint(0, 48, (2, 3, 4)))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.randint(0, 48, (2, 5)), attention_mask=torch.ones(3, 5))


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", 31, "hidden_size"),
    ("attention_type", "softmax", "attention_type"),
    ("leak", 1.5, "leak"),
    ("threshold", 0.0, "threshold"),
    ("surrogate", "relu", "surrogate"),
    ("reset", "none", "reset"),
    ("time_steps", 0, "time_steps"),
    ("attention_decay", [0.5], "attention_decay"),
    ("norm_type", "batchnorm", "norm_type"),
])
def test_bad_config_values_fail_at_construction(field, value, message):
    with pytest.raises(Exception, match=message):
        tiny_config(**{field: value})


# ---------------------------------------------------------------- Hugging Face contract


def test_save_and_load_round_trip_without_pickle(tmp_path, char_tokenizer):
    model = tiny_model("ssa", vocab_size=len(char_tokenizer))
    model.save_pretrained(tmp_path)
    char_tokenizer.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    assert {"modeling_spikelm.py", "configuration_spikelm.py", "neurons.py"} <= files
    assert "AutoModelForCausalLM" in json.loads((tmp_path / "config.json").read_text())["auto_map"]

    ids = torch.randint(0, len(char_tokenizer), (2, 16))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert type(loaded) is SpikeLMForCausalLM
        assert torch.equal(loaded(ids, use_cache=False).logits, expected)
    assert AutoTokenizer.from_pretrained(tmp_path).decode(char_tokenizer("To be")["input_ids"]) == "To be"

    # a fresh process that never imports spikelm loads the copied code
    torch.save(ids, tmp_path / "ids.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
ids = torch.load({str(tmp_path / 'ids.pt')!r})
with torch.no_grad():
    torch.save(model(ids, use_cache=False).logits, {str(tmp_path / 'remote.pt')!r})
assert "spikelm" not in sys.modules, "spikelm was imported"
print(type(model).__module__)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "transformers_modules" in run.stdout
    assert torch.equal(torch.load(tmp_path / "remote.pt"), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_equals_argmax_by_hand(kind):
    model = tiny_model(kind)
    prompt = torch.randint(0, 48, (1, 7))
    generated = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(12):
            next_id = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], 1)
    assert torch.equal(generated, ids)


def test_compiled_decode_step_gives_the_eager_logits_and_tokens():
    # one compilation (tens of seconds): the gated ssa model, the most state a step updates
    model = tiny_model("ssa", torch.float64, gated_decay=True)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.attention.gate_proj.weight.normal_(0.0, 1.0)
    prompt = torch.randint(0, 48, (2, 9))
    eager = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0, output_logits=True,
                           return_dict_in_generate=True)
    model.compile_decode()
    try:
        compiled = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0, output_logits=True,
                                  return_dict_in_generate=True)
        with count_inference(model) as counted:  # energy counting takes the eager step, and counts it
            model.generate(prompt[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    finally:
        model.compile_decode(False)
    with count_inference(model) as reference:
        model.generate(prompt[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(compiled.sequences, eager.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(compiled.logits, eager.logits)) <= 1e-9
    assert counted.tokens == 9 + 2 and counted.total() == reference.total() and counted.total().ac > 0


def test_left_padded_batch_generates_like_single_prompts():
    model = tiny_model("ssa", torch.float64)
    a, b = torch.randint(3, 48, (1, 9)), torch.randint(3, 48, (1, 5))
    pad = torch.full((1, 4), 2)
    batch = torch.cat([a, torch.cat([pad, b], 1)])
    mask = torch.cat([torch.ones(1, 9), torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1)]).long()
    together = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=2)
    alone_a = model.generate(a, max_new_tokens=8, do_sample=False, pad_token_id=2)
    alone_b = model.generate(b, max_new_tokens=8, do_sample=False, pad_token_id=2)
    assert torch.equal(together[0, 9:], alone_a[0, 9:])
    assert torch.equal(together[1, 9:], alone_b[0, 5:])


def test_sampling_options_streamer_and_stop_strings(char_tokenizer):
    model = tiny_model("sdsa", vocab_size=len(char_tokenizer))
    ids = char_tokenizer("To be", return_tensors="pt")["input_ids"]
    out = model.generate(ids, do_sample=True, top_k=5, top_p=0.9, temperature=0.8, repetition_penalty=1.3,
                         max_new_tokens=10, pad_token_id=2)
    assert out.shape == (1, ids.shape[1] + 10)
    beams = model.generate(ids, num_beams=3, max_new_tokens=6, do_sample=False, pad_token_id=2)
    assert beams.shape == (1, ids.shape[1] + 6)
    streamer = TextIteratorStreamer(char_tokenizer, skip_prompt=True)
    import threading
    thread = threading.Thread(target=model.generate, kwargs=dict(input_ids=ids, max_new_tokens=10, do_sample=False,
                                                                 streamer=streamer, pad_token_id=2))
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    greedy = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=2)
    assert streamed == char_tokenizer.decode(greedy[0, ids.shape[1]:])
    # a stop string made of the greedy continuation's first characters ends generation there
    stop = char_tokenizer.decode(greedy[0, ids.shape[1]:ids.shape[1] + 2])
    stopped = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=2, stop_strings=[stop],
                             tokenizer=char_tokenizer)
    assert stopped.shape[1] <= ids.shape[1] + 2 + 1


def test_text_generation_pipeline(tmp_path, char_tokenizer):
    tiny_model("ssa", vocab_size=len(char_tokenizer)).save_pretrained(tmp_path)
    char_tokenizer.save_pretrained(tmp_path)
    generator = pipeline("text-generation", model=str(tmp_path))
    result = generator("To be", max_new_tokens=8, do_sample=False)
    assert isinstance(result[0]["generated_text"], str)
    assert result[0]["generated_text"].startswith("To be") and len(result[0]["generated_text"]) > len("To be")


def test_trainer_trains_and_loss_falls(tmp_path, char_tokenizer):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from conftest import shakespeare_text

    ids = char_tokenizer(shakespeare_text(40_000))["input_ids"]
    block = 64
    blocks = [ids[i:i + block] for i in range(0, len(ids) - block, block)]
    train = Dataset.from_dict({"input_ids": blocks[:-8], "labels": blocks[:-8]})
    held_out = torch.tensor(blocks[-8:])
    model = SpikeLMForCausalLM(tiny_config("ssa", vocab_size=len(char_tokenizer), hidden_size=64, intermediate_size=128))
    model.eval()
    with torch.no_grad():
        before = model(held_out, labels=held_out).loss.item()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8,
                             learning_rate=5e-3, warmup_steps=3, logging_steps=5, use_cpu=True, report_to="none",
                             save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train)
    trainer.train()
    model.eval()
    with torch.no_grad():
        after = model(held_out, labels=held_out).loss.item()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 30
    assert after < before - 0.5, (before, after)
    assert losses[-1] < losses[0]


def test_auto_classes_find_spikelm():
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model("spikelm", vocab_size=48, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2)
    assert type(config) is SpikeLMConfig
    base = AutoModel.from_config(config)
    assert type(base).__name__ == "SpikeLMModel"
    out = base(torch.randint(0, 48, (1, 5)), use_cache=False)
    assert out.spikes.shape == (config.time_steps, 1, 5, 32)
    assert out.last_hidden_state.shape == (1, 5, 32)
    assert type(AutoModelForCausalLM.from_config(config)) is SpikeLMForCausalLM


def test_long_prefill_runs_in_chunks_with_the_same_logits():
    from spikelm.modeling_spikelm import ATTENTION_CHUNK

    model = tiny_model("ssa", torch.float64)
    ids = torch.randint(0, 48, (1, ATTENTION_CHUNK * 2 + 37))
    with torch.no_grad():
        whole = model(ids, use_cache=False).logits  # one pass of the stack
        chunked = model(ids, use_cache=True)  # the stack chunk by chunk, state carried
    assert chunked.cache.get_seq_length() == ids.shape[1]
    assert (whole - chunked.logits).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", ["ssa", "sdsa"])
def test_head_on_spike_counts_gives_the_logits_and_acs_of_T_heads(kind):
    # The head is fed the per-token spike counts (one matmul) instead of each step's spikes (T matmuls):
    # mean_t W s_t = W (sum_t s_t) / T. In float64 both are exact sums of float32 weights, so equal bit for bit.
    from spikelm import count_energy

    torch.manual_seed(0)
    model = SpikeLMForCausalLM(tiny_config(kind, time_steps=4)).double().eval()
    ids = torch.randint(0, 48, (2, 12))
    with torch.no_grad(), count_energy(model) as counts_form:
        logits = model(ids, use_cache=False).logits
        spikes = model.model(ids, use_cache=False).spikes  # [T, B, N, D]
    assert spikes.sum() > 0 and not torch.equal(spikes[0], spikes[1])  # the T steps differ: a real test
    with torch.no_grad(), count_energy(model) as steps_form:
        per_step = [model.lm_head(spikes[t:t + 1])[0] for t in range(spikes.shape[0])]
    assert torch.equal(logits, torch.stack(per_step).mean(0))
    head = ("head", "weights")
    assert counts_form.ac[head] == steps_form.ac[head] == 48 * int(spikes.sum())


def test_a_deep_copy_of_the_cache_owns_its_tensors_and_continues_alike():
    import copy

    model = tiny_model("ssa", torch.float64)
    ids = torch.randint(0, 48, (2, 9))
    with torch.no_grad():
        cache = model(ids[:, :8], use_cache=True).cache
        copied = copy.deepcopy(cache)
        assert copied.seen_tokens == cache.seen_tokens and len(copied.layers) == len(cache.layers)
        for layer, twin in zip(cache.layers, copied.layers):
            for tensor, other in zip(layer.tensors(), twin.tensors()):
                assert torch.equal(tensor, other) and tensor.data_ptr() != other.data_ptr()
        # both continue with the same logits; the original's update leaves the copy as it was
        before = [t.clone() for t in copied.layers[0].tensors()]
        first = model(ids[:, 8:], cache=cache).logits
        assert all(torch.equal(a, b) for a, b in zip(before, copied.layers[0].tensors()))
        assert torch.equal(model(ids[:, 8:], cache=copied).logits, first)
