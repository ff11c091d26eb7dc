"""spikelm.teacher_init: a spiking student from a GPT-2 or Llama-style teacher's weights."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from spikelm.conversion import ann_twin_config, is_spike_driven
from spikelm.errors import SpikeLMError
from spikelm.modeling_spikelm import SpikeLMForCausalLM
from spikelm.teacher_init import activation_clips, copy_teacher_weights, init_from_teacher, student_config

V, D = 48, 32


def gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=2, n_inner=64)).eval()


def llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=48)).eval()


def twin_of(teacher):
    twin = SpikeLMForCausalLM(ann_twin_config(student_config(teacher, time_steps=4)))
    return copy_teacher_weights(teacher, twin)


def test_gpt2_weights_land_where_they_belong():
    teacher = gpt2()
    twin = twin_of(teacher)
    assert (twin.config.hidden_size, twin.config.num_hidden_layers, twin.config.intermediate_size) == (D, 2, 64)
    assert torch.equal(twin.model.embed_tokens.weight, teacher.transformer.wte.weight)
    assert torch.equal(twin.lm_head.weight, teacher.lm_head.weight)
    for block, layer in zip(teacher.transformer.h, twin.model.layers):
        W = block.attn.c_attn.weight  # [in, 3 out]
        kv = layer.attention.kv_proj.weight
        assert torch.equal(layer.attention.q_proj.weight, W[:, :D].t())
        assert torch.equal(kv[:D, :D], W[:, D:2 * D].t()) and torch.equal(kv[D:, :D], W[:, 2 * D:].t())
        assert kv[:, D:].abs().sum() == 0  # the token-shift half starts at zero
        assert torch.equal(layer.attention.o_proj.weight, block.attn.c_proj.weight.t())
        assert torch.equal(layer.mlp.fc_in.weight, block.mlp.c_fc.weight.t())
        assert torch.equal(layer.mlp.fc_out.weight, block.mlp.c_proj.weight.t())
        assert torch.equal(layer.attention_norm.weight, block.ln_1.weight)
        assert torch.equal(layer.mlp_norm.bias, block.ln_2.bias)
    assert torch.equal(twin.model.norm.weight, teacher.transformer.ln_f.weight)


def test_llama_weights_land_where_they_belong_grouped_heads_repeated():
    teacher = llama()
    twin = twin_of(teacher)
    assert twin.config.norm_type == "rmsnorm" and twin.config.intermediate_size == 48
    d = D // 4
    for block, layer in zip(teacher.model.layers, twin.model.layers):
        kv = layer.attention.kv_proj.weight
        k = block.self_attn.k_proj.weight.view(2, d, D)  # two K heads, each serving two query heads
        assert torch.equal(kv[:D, :D].view(4, d, D)[0], k[0]) and torch.equal(kv[:D, :D].view(4, d, D)[1], k[0])
        assert torch.equal(kv[:D, :D].view(4, d, D)[2], k[1])
        assert torch.equal(layer.attention.q_proj.weight, block.self_attn.q_proj.weight)
        assert torch.equal(layer.mlp.fc_in.weight, block.mlp.gate_proj.weight)
        assert torch.equal(layer.mlp.fc_out.weight, block.mlp.down_proj.weight)
        assert torch.equal(layer.attention_norm.weight, block.input_layernorm.weight)
    assert torch.equal(twin.model.embed_tokens.weight, teacher.model.embed_tokens.weight)


@pytest.mark.parametrize("make", [gpt2, llama])
def test_the_student_is_spike_driven_with_thresholds_folded_from_the_teachers_activations(make):
    teacher = make()
    batches = [torch.randint(0, V, (4, 16)) for _ in range(2)]
    clips = activation_clips(teacher, batches)
    assert all(clip > 0 for clip in clips.values()) and len(clips) == 2 * 7 + 1
    # the final norm's clip is the 99.9th percentile of the positive outputs of the teacher's final norm
    final = teacher.transformer.ln_f if make is gpt2 else teacher.model.norm
    outputs = []
    handle = final.register_forward_hook(lambda module, inputs, output: outputs.append(output.flatten()))
    with torch.no_grad():
        for ids in batches:
            teacher(input_ids=ids)
    handle.remove()
    positive = torch.cat(outputs)[torch.cat(outputs) > 0]
    assert clips["model.output_neuron"] == pytest.approx(float(torch.quantile(positive, 0.999)), rel=1e-5)

    student = init_from_teacher(teacher, batches, time_steps=4)
    assert student.config.neuron_type == "if" and student.config.time_steps == 4
    assert is_spike_driven(student, batches[0][:1])
    # conversion folds the output clip into the head: the head's columns are the teacher's times the clip
    head = teacher.get_output_embeddings().weight
    assert torch.allclose(student.lm_head.weight, head * clips["model.output_neuron"], rtol=1e-5, atol=1e-7)


def test_other_families_are_refused_with_the_supported_ones_named():
    teacher = OPTForCausalLM(OPTConfig(vocab_size=V, hidden_size=D, num_hidden_layers=1, num_attention_heads=2,
                                       ffn_dim=64, word_embed_proj_dim=D))
    with pytest.raises(SpikeLMError, match="maps GPT-2 and Llama-style teachers .*gpt2, llama.*'opt'"):
        student_config(teacher)
