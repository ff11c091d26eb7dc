import pytest
import torch
from transformers import GPT2LMHeadModel

from spikelm import SpikeLMConfig, SpikeLMForCausalLM
from spikelm.presets import PRESETS
from spikelm.references import gpt2_parameters, matched_gpt2_config, relu_twin_config, spikelm_parameters


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("gated", [False, True])
def test_matched_gpt2_has_spikelms_parameters_within_one_percent(name, gated):
    config = SpikeLMConfig(**{**PRESETS[name], "gated_decay": gated})
    gpt2 = matched_gpt2_config(config, block_size=128)
    spiking, reference = spikelm_parameters(config), gpt2_parameters(gpt2)
    assert abs(reference - spiking) <= 0.01 * spiking, (name, spiking, reference)
    # the same shape where it is not the free variable; untied like spikelm; positions = the block
    assert (gpt2.n_embd, gpt2.n_layer, gpt2.n_head, gpt2.vocab_size) == (
        config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.vocab_size)
    assert gpt2.tie_word_embeddings is False and config.tie_word_embeddings is False
    assert gpt2.n_positions == 128


def test_counts_are_those_of_real_models():
    config = SpikeLMConfig(**PRESETS["tiny"])
    gpt2 = GPT2LMHeadModel(matched_gpt2_config(config, block_size=64))
    spiking = SpikeLMForCausalLM(config)
    assert gpt2_parameters(gpt2.config) == sum(p.numel() for p in gpt2.parameters())
    assert spikelm_parameters(config) == sum(p.numel() for p in spiking.parameters())
    assert gpt2.lm_head.weight.data_ptr() != gpt2.transformer.wte.weight.data_ptr()  # really untied
    logits = gpt2(torch.randint(0, config.vocab_size, (1, 64))).logits
    assert logits.shape == (1, 64, config.vocab_size)


def test_relu_twin_holds_the_same_parameters():
    config = SpikeLMConfig(**PRESETS["small"])
    twin = relu_twin_config(config)
    assert spikelm_parameters(twin) == spikelm_parameters(config)
    assert (twin.neuron_type, twin.time_steps, twin.attention_type, twin.token_shift) == ("relu", 1, "ssa", True)
