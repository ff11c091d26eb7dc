import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from spikelm import SpikeLMForCausalLM, count_energy, energy_report, gpt2_reference_counts
from spikelm.energy import (CounterSwitch, EnergyCounter, EnergyCounts, Prices, ann_twin_reference_counts,
                            count_inference, head_average_traffic, kv_cache_traffic, neuron_ops, neuron_state_traffic, norm_ops, sdsa_ops,
                            ssa_ops, attention_state_traffic, summarise, token_shift_traffic,
                            weight_ops_on_spikes, weight_reads_dense, weight_reads_on_spikes)
from spikelm.modeling_spikelm import SpikingNeuron
from conftest import tiny_config


def hand_model(**overrides):
    """1 layer, D=4, one head (d=4), T=2, MLP 8, vocab 3. Every token's embedding is [3, 1, -1, -3], whose
    LayerNorm is about [1.342, 0.447, -0.447, -1.342]: over two steps (leak 0.5, threshold 1) the first
    element spikes twice (1.342; 0.171 + 1.342) and the others never, in each neuron fed by a norm.
    W_q = 2I and W_kv = [2I 0; 2I 0]: q, k and v spike in element 0 at both steps. Every other matrix is
    zero, so the residual stream never changes; with scale 0.5 the attention read-out (0.5 at most: one
    coinciding spike, divided by the decay sum) never spikes."""
    config = tiny_config("ssa", vocab_size=3, hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
                         time_steps=2, intermediate_size=8, leak=0.5, threshold=1.0, attention_scale=0.5,
                         **overrides)
    model = SpikeLMForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.zero_()
        model.model.embed_tokens.weight[:] = torch.tensor([3.0, 1.0, -1.0, -3.0])
        attention = model.model.layers[0].attention
        attention.q_proj.weight[:] = 2 * torch.eye(4)
        attention.kv_proj.weight[:4, :4] = 2 * torch.eye(4)
        attention.kv_proj.weight[4:, :4] = 2 * torch.eye(4)
    return model


def test_counts_equal_hand_computed_values():
    model = hand_model()
    report = energy_report(model, torch.zeros(1, 2, dtype=torch.long))
    rows = {(r["layer"], r["kind"]): r for r in report["rows"]}
    tokens = 2
    # weights, layer 0 (ACs = out x input spikes). Spikes per token: 2 into q_proj and fc_in; kv_proj reads
    # [s_i ; s_(i-1)]: 2 spikes for the first token, 4 for the second; o_proj and fc_out get none.
    assert rows[("layers.0", "weights")]["ac"] * tokens == 4 * 4 + 8 * 6 + 8 * 4
    assert rows[("layers.0", "weights")]["mac"] == 0
    # head: 3 outputs x 4 spikes, and one 1/T multiplication per logit
    assert rows[("head", "weights")]["ac"] * tokens == 3 * 4
    assert rows[("head", "weights")]["mac"] * tokens == 3 * 2
    # neurons, layer 0: 16 neurons per token (4 each: norm-fed attention and MLP inputs, q, k, v, read-out;
    # 8 hidden) x 2 tokens x 2 steps = 128 neuron-steps: 128 charges (MACs) + 128 comparisons (ACs);
    # 20 soft resets (attention and MLP inputs, q, k, v: 4 spikes each); 2 residual adds x 4 x 2 steps x 2 tokens
    assert rows[("layers.0", "neurons")]["ac"] * tokens == 128 + 20 + 32
    assert rows[("layers.0", "neurons")]["mac"] * tokens == 128
    # head neuron: 4 neurons x 2 steps x 2 tokens = 16 steps, 4 spikes
    assert rows[("head", "neurons")]["ac"] * tokens == 16 + 4
    assert rows[("head", "neurons")]["mac"] * tokens == 16
    # norms: LayerNorm on 4 vectors (2 steps x 2 tokens) each: 2D+1 = 9 ACs, 3D+2 MACs + an rsqrt of 7 MACs
    # (Newton-Raphson) = 21 MACs per vector
    assert rows[("layers.0", "norms")]["ac"] * tokens == 2 * 4 * 9
    assert rows[("layers.0", "norms")]["mac"] * tokens == 2 * 4 * 21
    assert rows[("head", "norms")]["ac"] * tokens == 4 * 9 and rows[("head", "norms")]["mac"] * tokens == 4 * 21
    # attention: 4 (k, v) pairs (one per step and token) + 4 q spikes x d=4 read-out adds;
    # per token: T*H*d*d = 32 decay MACs, 1 for z, 4 for 1/z (Newton-Raphson) and 1 for scale * (1/z),
    # T*H*d = 8 read-out scalings
    assert rows[("layers.0", "attention")]["ac"] * tokens == 4 + 16
    assert rows[("layers.0", "attention")]["mac"] * tokens == 2 * (32 + 1 + 4 + 1 + 8)
    assert report["ac_per_token"] * tokens == 436
    assert report["mac_per_token"] * tokens == 128 + 2 * 4 * 21 + 16 + 4 * 21 + 2 * 46 + 3 * 2  # 494
    assert report["mac_per_token"] * tokens == 494
    assert report["pj_per_token"] == pytest.approx((0.9 * 436 + 4.6 * 494) / 2, rel=1e-12)
    # memory, in values. Weight reads: one column per input spike, as the ACs: 16 + 48 + 32 in layer 0; the head
    # is fed each token's spike counts (element 0: 2) and reads that column once: 3 per token. Neuron state:
    # each membrane read and written once per step: 128 + 16 neuron-steps. Attention state: T*H*d*d + H = 33
    # values per token, read and written (the head, fed counts, keeps no running sum over the steps). Token
    # shift: T*D = 8 one-bit spikes per token, read and written.
    assert report["weight_reads_per_token"] * tokens == 16 + 48 + 32 + 6
    assert report["state_reads_per_token"] * tokens == 144 + 66
    assert report["state_writes_per_token"] * tokens == 144 + 66
    assert report["spike_reads_per_token"] * tokens == 16 and report["spike_writes_per_token"] * tokens == 16
    # fp32 in an 8 KiB SRAM: 10 pJ per 64 bits, so 5 pJ per 32-bit value and 10/64 pJ per spike
    assert report["memory_pj_per_token"] * tokens == pytest.approx((102 + 210 + 210) * 5 + 32 * 10 / 64, rel=1e-12)
    assert report["total_pj_per_token"] == pytest.approx(report["pj_per_token"] + report["memory_pj_per_token"])
    assert report["spikes_per_token"] * tokens == 20 + 4
    assert report["firing_rate_per_layer"]["layers.0"] == 20 / 128
    assert report["firing_rate_per_layer"]["head"] == 4 / 16
    # the totals are the sum of the rows
    assert sum(r["ac"] for r in report["rows"]) == pytest.approx(report["ac_per_token"])
    assert sum(r["pj"] for r in report["rows"]) == pytest.approx(report["pj_per_token"])


def test_gated_decay_adds_its_gate_and_nothing_else():
    """The hand model with a gate g = sigmoid(W_g s + b) (W_g zeroed like the other matrices): W_g [1 x 4] reads
    the attention neuron's 2 spikes per token (1 AC each); per head and token the gate adds T - 1 = 1 AC to sum
    the steps, 1 MAC for 1/T, 1 AC for the bias, and for the sigmoid 1 MAC (exp), 1 AC (+ 1) and the
    reciprocal's 4 MACs (Newton-Raphson, as 1/z)."""
    fixed = energy_report(hand_model(), torch.zeros(1, 2, dtype=torch.long))
    gated = energy_report(hand_model(gated_decay=True), torch.zeros(1, 2, dtype=torch.long))
    rows = lambda report: {(r["layer"], r["kind"]): r for r in report["rows"]}  # noqa: E731
    fixed_rows, gated_rows = rows(fixed), rows(gated)
    tokens = 2
    assert gated_rows[("layers.0", "weights")]["ac"] * tokens == fixed_rows[("layers.0", "weights")]["ac"] * tokens + 4
    assert gated_rows[("layers.0", "attention")]["ac"] * tokens == 4 + 16 + tokens * 3
    # the fixed decay's 46 MACs a token (1/z by Newton-Raphson: 4 MACs, see test_counts_equal_hand_computed_values)
    assert gated_rows[("layers.0", "attention")]["mac"] * tokens == 2 * (32 + 1 + 4 + 1 + 8) + tokens * 6
    assert gated["ac_per_token"] * tokens == 436 + 4 + 6
    assert gated["mac_per_token"] * tokens == 494 + 12  # 494: the fixed model's MACs (test_counts_...)


def test_rules():
    assert neuron_ops(10, 4, 7, leak_is_one=False, reset="soft") == (47, 40)
    assert neuron_ops(10, 4, 7, leak_is_one=True, reset="hard") == (80, 0)
    # rmsnorm, D=8: squares 8, scaling 1, rsqrt 7, normalise 8, gain 8 = 32 MACs and 1 AC per vector
    assert norm_ops("rmsnorm", 8, 3) == (3, 3 * 32)
    # layernorm, D=8: 17 ACs; squares 8, mean and variance scaling 2, rsqrt 7, normalise 8, affine 8 = 33 MACs
    assert norm_ops("layernorm", 8, 1) == (17, 33)
    # decay 2*1*4*4 = 32, z 1, 1/z 4, scale * (1/z) 1, read-out scaling 2*1*4 = 8
    assert ssa_ops(2, 1, 4, 1, kv_pairs=5, q_spikes=2) == (13, 32 + 1 + 4 + 1 + 8)
    # T=2, H=2, D=8, 1 token: decay 16, z 2, 1/z 2*4, S/z 16; 3 coincidences + q masks 16
    assert sdsa_ops(2, 2, 8, 1, coincidences=3) == (19, 16 + 2 + 8 + 16)


def test_weight_rules_are_linear_in_the_spikes():
    # the counter works a matrix's counts out for one spike and scales them by each row's spikes
    for out, spikes in ((5, 0), (5, 3), (1024, 117)):
        assert weight_ops_on_spikes(out, spikes) == tuple(spikes * part for part in weight_ops_on_spikes(out, 1))
        assert weight_reads_on_spikes(out, spikes) == spikes * weight_reads_on_spikes(out, 1)


def test_memory_rules():
    assert weight_reads_on_spikes(5, 3) == 15  # three input spikes fetch three columns of 5
    assert weight_reads_dense(4, 3, 2) == 24  # two input vectors fetch all 12 weights each
    assert neuron_state_traffic(10) == (10, 10)
    # ssa, T=2, H=2, d=4: S is 2*2*16 values, read and written each token, with the 2 decay sums; 3 tokens
    assert attention_state_traffic(2 * 2 * 16, 2, 3) == (3 * (2 * 2 * 16 + 2),) * 2
    assert attention_state_traffic(2 * 8, 2, 3) == (3 * (2 * 8 + 2),) * 2  # sdsa, T=2, D=8
    assert token_shift_traffic(2, 8, 3) == (48, 48)
    assert head_average_traffic(4, 10, 2) == (60, 60)  # steps 2..4 read and write 10 running logits, 2 positions
    assert head_average_traffic(1, 10, 2) == (0, 0)
    # 3 tokens at positions 4, 5, 6 (context 15), D=8, 2 layers: reads 2*8 per position, writes 2*8 per token
    assert kv_cache_traffic(8, 2, 3, 15) == (2 * 8 * 2 * 15, 2 * 8 * 2 * 3)


def test_prices():
    assert (Prices().e_ac, Prices().e_mac, Prices().bits) == (0.9, 4.6, 32)
    assert (Prices("bf16").e_ac, Prices("bf16").e_mac, Prices("bf16").bits) == (0.4, 1.5, 16)
    assert (Prices("int8").e_ac, Prices("int8").e_mac, Prices("int8").bits) == (0.03, 0.23, 8)
    counts = EnergyCounts(ac=10, mac=2, weight_reads=64, state_reads=2, state_writes=2, spike_reads=64)
    assert Prices().compute_pj(counts) == pytest.approx(9 + 9.2)
    # (64 + 2) fp32 values read, 2 written, at 10 pJ per 64 bits = 5 pJ a value; 64 spikes read = 64 bits: 10 pJ
    assert Prices().memory_pj(counts) == pytest.approx(66 * 5 + 2 * 5 + 10)
    assert Prices("int8").memory_pj(counts) == pytest.approx(68 * 1.25 + 10)
    dram = Prices("fp32", read_pj_per_64_bits=2000.0, write_pj_per_64_bits=2000.0)
    assert dram.memory_pj(counts) == pytest.approx(200 * Prices().memory_pj(counts))
    with pytest.raises(ValueError, match="precision must be one of"):
        Prices("fp8")
    with pytest.raises(ValueError, match="non-negative"):
        Prices(e_ac=-1.0)


def test_gpt2_reference_rules_on_a_hand_computed_case():
    config = tiny_config("ssa", vocab_size=3, hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
                         intermediate_size=8)
    # 3 tokens, logits at the last one only: weights 3 * (4*16 + 2*4*8) = 384, attention 2*4 * (1+2+3) = 48,
    # head 1 * 3*4 = 12; 3 layernorms per token (2 per layer and the last): 9 ACs, 21 MACs each; 2*4 residual
    # adds per token
    reference = gpt2_reference_counts(config, 3, logits=1)
    assert (reference["weights"], reference["attention"], reference["head"]) == (384, 48, 12)
    counts = reference["counts"]
    assert counts.mac == 384 + 48 + 12 + 3 * 3 * 21 and reference["total"] == counts.mac
    assert counts.ac == 3 * 3 * 9 + 3 * 8
    assert counts.weight_reads == 384 + 12  # dense: every weight for each token, the head for its logit
    assert (counts.state_reads, counts.state_writes) == (2 * 4 * 6, 2 * 4 * 3)  # the KV cache
    # the same tokens as positions 3, 4, 5 of a longer sequence: only the attention and the cache reads grow
    later = gpt2_reference_counts(config, 3, logits=1, context=3 + 4 + 5)
    assert later["attention"] == 2 * 4 * 12 and later["counts"].state_reads == 2 * 4 * 12


def test_ann_twin_reference_rules_on_a_hand_computed_case():
    config = tiny_config("ssa", vocab_size=3, hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
                         intermediate_size=8)
    counts = ann_twin_reference_counts(config, tokens=2, logits=1)
    # per token: weights q 16 + kv (8 in, token shift) 8*8 + o 16 + MLP 2*4*8 = 160 MACs;
    # attention: 3 * 16 (decay, k v^T, q S) + 1 (z) + 4 (1/z) + 1 (scale) + 4 (read-out scaling) = 58 MACs;
    # 3 layernorms: 21 MACs and 9 ACs each; ReLU comparisons: 4 + 4*4 + 4 + 8 + 4 (output) = 36 ACs;
    # residual adds 2 * 4; head 3 * 4 MACs for the one logit
    assert counts.mac == 2 * (160 + 58 + 63) + 12
    assert counts.ac == 2 * (36 + 27 + 8)
    assert counts.weight_reads == 2 * 160 + 12
    # attention state 16 + z 1, token shift 4 real values: read and written each token
    assert (counts.state_reads, counts.state_writes) == (2 * 21, 2 * 21)
    sdsa = ann_twin_reference_counts(tiny_config("sdsa", vocab_size=3, hidden_size=4, num_hidden_layers=1,
                                                 num_attention_heads=1, intermediate_size=8), tokens=1)
    # sdsa: 2*4 (decay, k*v) + 1 (z) + 4 (1/z) + 4 (S/z) + 4 (q times the read-out) = 21 attention MACs
    assert sdsa.mac == 160 + 21 + 63 + 12
    assert (sdsa.state_reads, sdsa.state_writes) == (4 + 1 + 4, 4 + 1 + 4)


def test_summary_prices_each_reference_at_its_precision():
    config = tiny_config("ssa")
    counts = EnergyCounts(ac=1000, mac=100, weight_reads=500, state_reads=300, state_writes=300, spike_reads=64,
                          spike_writes=64, tokens=4, logits=4, context=10)
    summary = summarise(counts, config, Prices("bf16"))
    mine, refs = summary["spikelm"], summary["references"]
    assert mine["compute_pj"] == pytest.approx((0.4 * 1000 + 1.5 * 100) / 4)
    assert mine["memory_pj"] == pytest.approx(((500 + 300 + 300) * 16 * 10 / 64 + 128 * 10 / 64) / 4)
    assert mine["total_pj"] == pytest.approx(mine["compute_pj"] + mine["memory_pj"])
    gpt2 = gpt2_reference_counts(config, 4, logits=4, context=10)["counts"]
    assert refs["gpt2_fp32"]["compute_pj"] == pytest.approx(Prices("fp32").compute_pj(gpt2) / 4)
    assert refs["gpt2_int8"]["memory_pj"] == pytest.approx(Prices("int8").memory_pj(gpt2) / 4)
    assert refs["ann_twin"]["precision"] == "bf16"  # the twin is priced at the report's precision
    for figures in refs.values():
        assert figures["total_ratio"] == pytest.approx(mine["total_pj"] / figures["total_pj"])
        assert figures["mac"] > 0 and figures["weight_reads"] > 0
    assert set(mine["by_precision"]) == {"fp32", "bf16", "int8"}
    assert mine["by_precision"]["int8"]["total_pj"] < mine["by_precision"]["fp32"]["total_pj"]


@pytest.mark.parametrize("kind", ["ssa", "sdsa"])
def test_weight_acs_equal_an_independent_recount_from_hooks(kind):
    model = SpikeLMForCausalLM(tiny_config(kind)).eval()
    recount = []

    def hook(module, inputs, output):
        # a spike-fed matrix: its 1s; the head, fed per-token spike counts: the spikes they count
        spikes = inputs[0].sum() if module is model.lm_head else (inputs[0] == 1).sum()
        recount.append(module.out_features * int(spikes))

    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(hook)
    ids = torch.randint(0, 48, (2, 20))
    report = energy_report(model, ids)
    weight_acs = sum(r["ac"] for r in report["rows"] if r["kind"] == "weights") * report["tokens"]
    assert weight_acs == pytest.approx(sum(recount), rel=0, abs=1e-6)
    assert sum(recount) > 0
    assert 0 < report["firing_rate"] < 1
    assert report["ann_pj_per_token"] > 0 and report["energy_ratio"] == report["pj_per_token"] / report["ann_pj_per_token"]


def test_gpt2_reference_matches_a_count_from_gpt2():
    D, L, H, V, N, inner = 32, 2, 4, 50, 24, 96
    config = GPT2Config(n_embd=D, n_layer=L, n_head=H, vocab_size=V, n_positions=64, n_inner=inner,
                        bos_token_id=None, eos_token_id=None, attn_implementation="eager")
    gpt2 = GPT2LMHeadModel(config)
    gpt2.eval()
    weight_macs = []

    def hook(module, inputs, output):
        x = inputs[0]
        weight_macs.append(module.weight.numel() * (x.numel() // x.shape[-1]))

    for m in gpt2.modules():
        if type(m).__name__ == "Conv1D" or isinstance(m, nn.Linear):
            m.register_forward_hook(hook)
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        gpt2(torch.randint(0, V, (1, N)))
    reference = gpt2_reference_counts(config, N)
    assert reference["weights"] + reference["head"] == sum(weight_macs)
    # attention: the causal half of q.k and of the weighted sum of values, a lower bound on what GPT-2 computes
    counted = flops.get_total_flops() // 2 - sum(weight_macs)  # 2 flops per MAC
    assert reference["attention"] == L * 2 * D * N * (N + 1) // 2
    assert reference["attention"] <= counted


def test_counters_run_during_generation_and_switch_off():
    model = SpikeLMForCausalLM(tiny_config("sdsa")).eval()
    with count_energy(model) as counter:
        model.generate(torch.randint(0, 48, (1, 5)), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert counter.tokens == 5 + 3  # the prompt, then one forward per new token but the last
    report = counter.report()
    assert report["pj_per_token"] > 0 and report["spikes_per_token"] > 0
    assert all(m.counter is None for m in model.modules() if hasattr(m, "counter"))
    assert not any(m._forward_hooks for m in model.modules())


def _gpt2_macs_by_hand(config, tokens, logits, context):
    """The same-shape GPT-2's MACs, written out: weights, attention products, head, layernorms."""
    D, L, V, inner = config.hidden_size, config.num_hidden_layers, config.vocab_size, config.intermediate_size
    return (tokens * L * (4 * D * D + 2 * D * inner) + L * 2 * D * context + logits * V * D
            + tokens * (2 * L + 1) * (3 * D + 2 + 7))


def test_reference_charges_the_head_only_for_the_logits_generate_computes(char_tokenizer):
    """Defect 1: generate() prefills with logits_to_keep=1, so spikelm computes its head for the last prompt
    token only; the reference must not charge GPT-2's head for every prompt token."""
    from spikelm.generation import generate_with_energy

    config = tiny_config("ssa", vocab_size=len(char_tokenizer))
    model = SpikeLMForCausalLM(config).eval()
    prompt = "To be, or not to be, that is the question:"
    prompt_tokens = len(char_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    _, report = generate_with_energy(model, char_tokenizer, prompt, max_new_tokens=6, greedy=True)
    tokens = report["tokens"]  # the prompt, then one forward per new token but the last
    new = tokens - prompt_tokens + 1
    assert 1 <= new <= 6
    expected = _gpt2_macs_by_hand(config, tokens, logits=new, context=tokens * (tokens + 1) // 2)
    assert report["ann_mac_per_token"] * tokens == pytest.approx(expected, rel=1e-12)
    head_for_every_token = (tokens - new) * config.vocab_size * config.hidden_size
    assert report["ann_mac_per_token"] * tokens < expected + head_for_every_token  # what main charged


def test_reference_counts_each_padded_row_at_its_real_length():
    """Defect 2: a padded batch's reference covers each row's real tokens, not B x N positions."""
    config = tiny_config("sdsa")
    model = SpikeLMForCausalLM(config).eval()
    ids = torch.randint(3, 48, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :8] = 0  # row 1: 8 pads on the left, 4 real tokens
    report = energy_report(model, ids, attention_mask=mask)
    assert report["tokens"] == 12 + 4
    expected = sum(_gpt2_macs_by_hand(config, n, logits=n, context=n * (n + 1) // 2) for n in (12, 4))
    assert report["ann_mac_per_token"] * report["tokens"] == pytest.approx(expected, rel=1e-12)
    # each row on its own gives the same reference
    alone = [energy_report(model, ids[:1]), energy_report(model, ids[1:, 8:])]
    assert sum(r["ann_mac_per_token"] * r["tokens"] for r in alone) == pytest.approx(expected, rel=1e-12)


def test_a_counter_switch_counts_each_forward_into_its_own_counter():
    # the serving engine installs the hooks once and swaps counters between forwards
    model = SpikeLMForCausalLM(tiny_config("sdsa")).eval()
    a, b = torch.randint(3, 48, (1, 7)), torch.randint(3, 48, (2, 5))
    expected = []
    for ids in (a, b):
        with count_inference(model) as counter:
            model(ids)
        expected.append(counter.total())
    switch = CounterSwitch()
    with torch.no_grad(), count_energy(model, switch):
        model(a)  # no target: counted nowhere
        first = switch.use(EnergyCounter())
        model(a)
        second = switch.use(EnergyCounter())
        model(b)
        switch.use(None)
        model(b)
    assert [first.total(), second.total()] == expected and first.report()["tokens"] == 7
    assert all(module.counter is None for module in model.modules() if hasattr(module, "counter"))


def test_a_switch_used_before_its_hooks_are_installed_follows_each_later_counter():
    # the switch binds its target's methods on itself for the modules' calls; the hooks must not keep the
    # counter that was in use when they were installed
    model = SpikeLMForCausalLM(tiny_config("ssa")).eval()
    ids = torch.randint(3, 48, (1, 6))
    with count_inference(model) as counter:
        model(ids)
    switch = CounterSwitch()
    early = switch.use(EnergyCounter())
    with torch.no_grad(), count_energy(model, switch):
        later = switch.use(EnergyCounter())
        model(ids)
    assert early.tokens == 0 and early.total() == EnergyCounts()
    assert later.total() == counter.total() and later.tokens == 6


@pytest.mark.parametrize("kernels_on", [True, False])
def test_counts_worked_out_once_per_shape_equal_fresh_counts(kernels_on, monkeypatch):
    # A counter notes the counts that depend on shapes only and works them out once per (module, shape), and once
    # per list of them (a decode step's): a switch's counters share that memo. Whatever order the shapes come in,
    # each forward's counts equal those of a fresh counter; with or without the C kernels (which count each row's
    # spikes as the neurons fire them, and attention's spike pairs).
    from spikelm import kernels

    if not kernels_on:
        monkeypatch.setattr(kernels, "_library", False)
    model = SpikeLMForCausalLM(tiny_config("ssa", gated_decay=True)).eval()
    forwards = [torch.randint(3, 48, shape) for shape in ((1, 7), (2, 3), (1, 7), (1, 1), (2, 3), (1, 7))]
    fresh = []
    for ids in forwards:
        with count_inference(model) as counter:
            model(ids)
        fresh.append([counts for counts, _ in counter.per_row()])
    switch = CounterSwitch()
    with torch.no_grad(), count_energy(model, switch):
        for ids, expected in zip(forwards, fresh):
            counter = switch.use(EnergyCounter())
            model(ids)
            assert [counts for counts, _ in counter.per_row()] == expected
    assert any(isinstance(key[0], int) for key in switch.memo)  # a forward's whole list, summed once
    with count_inference(model) as counter:  # the forwards in one counter: the sum of the fresh counts
        for ids in forwards:
            model(ids)
    total = EnergyCounts()
    for rows in fresh:
        for counts in rows:
            total += counts
    assert counter.total() == total


@pytest.mark.parametrize("attention_type", ["ssa", "sdsa"])
def test_one_row_shortcut_reads_what_the_general_path_reads(attention_type):
    # per_row() of a one-row forward (a prompt, then decode steps through a switch, as the serving engine
    # counts them) adds the varying counts to the memoised totals of the constant ones; the general path sums
    # every count. Same counts, same firing rates, every step; and reading does not change the counter.
    model = SpikeLMForCausalLM(tiny_config(attention_type, gated_decay=True)).eval()
    switch = CounterSwitch()
    with torch.no_grad(), count_energy(model, switch):
        counter = switch.use(EnergyCounter())
        cache = model(torch.randint(3, 48, (1, 7)), use_cache=True).cache
        steps = [counter]
        for position in range(7, 12):
            steps.append(switch.use(EnergyCounter(positions=[position])))
            cache = model(torch.randint(3, 48, (1, 1)), cache=cache, use_cache=True).cache
    for counter in steps:
        shortcut = counter._one_row()
        assert shortcut is not None
        assert counter._rows() == shortcut  # read twice: the same
        assert counter._rows(one_row_path=False) == shortcut
        assert shortcut[0][0].tokens == 7 if counter is steps[0] else 1
    # what varies from step to step is in: the position (context), and the spikes
    assert [c.per_row()[0][0].context for c in steps[1:]] == list(range(8, 13))


def test_counts_are_the_same_with_and_without_the_c_kernels(monkeypatch):
    from spikelm import kernels

    model = SpikeLMForCausalLM(tiny_config("ssa", gated_decay=True)).eval()
    ids = torch.randint(3, 48, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    counted = []
    for library in (kernels._load(), False):
        monkeypatch.setattr(kernels, "_library", library)
        with count_inference(model) as counter:
            out = model(ids, attention_mask=mask, use_cache=True)
            model(ids[:, -1:], attention_mask=torch.ones(2, 10, dtype=torch.long), cache=out.cache)
        counted.append(counter.per_row())
    assert counted[0] == counted[1] and counted[0][0][0].ac > 0


def test_per_row_equals_row_by_row():
    # the serving engine reads every row of a batched step at once
    model = SpikeLMForCausalLM(tiny_config("ssa", gated_decay=True)).eval()
    ids = torch.randint(3, 48, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[2, :6] = 0
    with count_inference(model) as counter:
        model(ids, attention_mask=mask)
        model(ids[:2, :4])  # a narrower second forward: rows 0 and 1 only
    rows = counter.per_row()
    assert len(rows) == 3
    for i, (counts, rates) in enumerate(rows):
        assert counts == counter.row(i) and rates == counter.row_firing_rate_per_layer(i)
    assert rows[0][0].tokens == 14 and rows[2][0].tokens == 4 and rows[0][0].ac > rows[2][0].ac > 0


@pytest.mark.parametrize("kind", ["ssa", "sdsa"])
def test_memory_traffic_equals_an_independent_recount_from_hooks_and_the_state(kind):
    config = tiny_config(kind)
    model = SpikeLMForCausalLM(config).eval()
    weight_reads, neuron_steps = [], []
    # a column per non-zero input: a spike, or the head's count of a token's spikes
    handles = [m.register_forward_hook(lambda m, i, o: weight_reads.append(m.out_features * int((i[0] != 0).sum())))
               for m in model.modules() if isinstance(m, nn.Linear)]
    handles += [m.register_forward_hook(lambda m, i, o: neuron_steps.append(o.numel()))
                for m in model.modules() if isinstance(m, SpikingNeuron)]
    B, N = 2, 9
    with count_inference(model) as counter:
        output = model(input_ids=torch.randint(0, 48, (B, N)), use_cache=True, logits_to_keep=1)
    for handle in handles:
        handle.remove()
    total = counter.total()
    assert total.weight_reads == sum(weight_reads) > 0
    # per token and layer the recurrent form reads and writes the whole state it leaves behind (all B rows)
    state = sum(layer.attention_state.numel() + layer.decay_sum.numel() for layer in output.cache.layers) * N
    assert total.state_reads == total.state_writes == sum(neuron_steps) + state  # the head keeps no running sum
    shift = sum(layer.previous_spikes.numel() for layer in output.cache.layers) * N  # [T, B, D] per token
    assert total.spike_reads == total.spike_writes == shift
    assert (total.tokens, total.logits, total.context) == (B * N, B, B * N * (N + 1) // 2)
