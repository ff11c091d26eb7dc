import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from spikelm import SpikeLMForCausalLM, count_energy, energy_report, gpt2_reference_counts
from spikelm.energy import norm_ops, neuron_ops, ssa_ops
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
    # norms: LayerNorm on 4 vectors (2 steps x 2 tokens) each: 2D+1 = 9 ACs, 3D+3 = 15 MACs per vector
    assert rows[("layers.0", "norms")]["ac"] * tokens == 2 * 4 * 9
    assert rows[("layers.0", "norms")]["mac"] * tokens == 2 * 4 * 15
    assert rows[("head", "norms")]["ac"] * tokens == 4 * 9 and rows[("head", "norms")]["mac"] * tokens == 4 * 15
    # attention: 4 (k, v) pairs (one per step and token) + 4 q spikes x d=4 read-out adds;
    # per token: T*H*d*d = 32 decay MACs, 1 for z, 1 for scale/z, T*H*d = 8 read-out scalings
    assert rows[("layers.0", "attention")]["ac"] * tokens == 4 + 16
    assert rows[("layers.0", "attention")]["mac"] * tokens == 2 * (32 + 1 + 1 + 8)
    assert report["ac_per_token"] * tokens == 436
    assert report["mac_per_token"] * tokens == 414
    assert report["pj_per_token"] == pytest.approx((0.9 * 436 + 4.6 * 414) / 2, rel=1e-12)
    assert report["spikes_per_token"] * tokens == 20 + 4
    assert report["firing_rate_per_layer"]["layers.0"] == 20 / 128
    assert report["firing_rate_per_layer"]["head"] == 4 / 16
    # the totals are the sum of the rows
    assert sum(r["ac"] for r in report["rows"]) == pytest.approx(report["ac_per_token"])
    assert sum(r["pj"] for r in report["rows"]) == pytest.approx(report["pj_per_token"])


def test_gated_decay_adds_its_gate_and_nothing_else():
    """The hand model with a gate g = sigmoid(W_g s + b) (W_g zeroed like the other matrices): W_g [1 x 4] reads
    the attention neuron's 2 spikes per token (1 AC each); per head and token the gate adds T - 1 = 1 AC to sum
    the steps, 1 MAC for 1/T, 1 AC for the bias, 2 MACs and 1 AC for the sigmoid."""
    fixed = energy_report(hand_model(), torch.zeros(1, 2, dtype=torch.long))
    gated = energy_report(hand_model(gated_decay=True), torch.zeros(1, 2, dtype=torch.long))
    rows = lambda report: {(r["layer"], r["kind"]): r for r in report["rows"]}  # noqa: E731
    fixed_rows, gated_rows = rows(fixed), rows(gated)
    tokens = 2
    assert gated_rows[("layers.0", "weights")]["ac"] * tokens == fixed_rows[("layers.0", "weights")]["ac"] * tokens + 4
    assert gated_rows[("layers.0", "attention")]["ac"] * tokens == 4 + 16 + tokens * 3
    assert gated_rows[("layers.0", "attention")]["mac"] * tokens == 2 * (32 + 1 + 1 + 8) + tokens * 3
    assert gated["ac_per_token"] * tokens == 436 + 4 + 6
    assert gated["mac_per_token"] * tokens == 414 + 6


def test_rules():
    assert neuron_ops(10, 4, 7, leak_is_one=False, reset="soft") == (47, 40)
    assert neuron_ops(10, 4, 7, leak_is_one=True, reset="hard") == (80, 0)
    assert norm_ops("rmsnorm", 8, 3) == (3, 78)
    assert ssa_ops(2, 1, 4, 1, kv_pairs=5, q_spikes=2) == (13, 32 + 2 + 8)


@pytest.mark.parametrize("kind", ["ssa", "sdsa"])
def test_weight_acs_equal_an_independent_recount_from_hooks(kind):
    model = SpikeLMForCausalLM(tiny_config(kind)).eval()
    recount = []

    def hook(module, inputs, output):
        recount.append(module.out_features * int((inputs[0] == 1).sum()))

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
