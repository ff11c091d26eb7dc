"""A spiking student that starts from a pretrained ANN teacher's weights instead of random ones.

    student = init_from_teacher(teacher, batches, time_steps=4)     # then distil from the same teacher

How, in three steps:
1. A QCFS twin (spikelm.conversion) of the teacher's width, depth, heads, MLP width and vocabulary receives
   every weight that has a place in it: token embeddings, LM head, norms, Q/K/V/O projections (K and V into
   the current-token half of `kv_proj`; the token-shift half starts at zero, so at first a key sees only its
   own token) and the MLP.
   - GPT-2: LayerNorms as they are; `c_attn` split into Q, K, V; `c_fc` -> fc_in, `c_proj` -> fc_out.
   - Llama-style (Llama, Mistral, Qwen2; RMSNorm, gated MLP): RMSNorm gains; grouped K/V heads repeated to
     one per query head; the gated MLP `down(silu(gate x) * up x)` becomes fc_out(neuron(fc_in x)) with
     fc_in = gate and fc_out = down: the spiking neuron after fc_in takes SiLU's place as the non-linearity,
     and the `up` branch, a multiplicative gate with no spike-driven counterpart, is left out.
   What has no place is left out too: biases (spikelm's matrices have none), position embeddings and
   rotary angles (spikelm's sense of position is its attention decay), and the softmax (spikelm's
   attention is linear).
2. Threshold balancing (Rueckauer et al. 2017, "robust normalisation"): on a few batches the teacher's
   activation at the place of each neuron population is recorded (the norm outputs before the attention and
   the MLP, Q, K and V, the attention output before `o_proj`, the MLP pre-activation, the final norm), and
   that population's clip is set to the 99.9th percentile of its positive values.
3. spikelm.conversion.convert_to_snn turns the twin into integrate-and-fire neurons with T = time_steps,
   folding each clip into the weights around it, exactly as `spikelm convert` does.
"""

import torch

from .configuration_spikelm import SpikeLMConfig
from .conversion import ann_twin_config, convert_to_snn
from .errors import SpikeLMError
from .modeling_spikelm import SpikeLMForCausalLM

LLAMA_STYLE = ("llama", "mistral", "qwen2")
SUPPORTED = ("gpt2",) + LLAMA_STYLE
PERCENTILE = 0.999
SAMPLED_VALUES = 1_000_000  # activations per population kept for the percentile


def _family(teacher) -> str:
    kind = teacher.config.model_type
    if kind not in SUPPORTED:
        raise SpikeLMError(f"--init-from-teacher maps GPT-2 and Llama-style teachers ({', '.join(SUPPORTED)}); "
                           f"the teacher is a {kind!r} model: distil without --init-from-teacher")
    return "gpt2" if kind == "gpt2" else "llama"


def student_config(teacher, time_steps=4, attention_type="ssa") -> SpikeLMConfig:
    """The spiking config of the teacher's shape (IF neurons come from conversion)."""
    c = teacher.config
    if _family(teacher) == "gpt2":
        shape = dict(hidden_size=c.n_embd, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                     intermediate_size=c.n_inner or 4 * c.n_embd, norm_type="layernorm",
                     norm_eps=c.layer_norm_epsilon)
    else:
        shape = dict(hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                     num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
                     norm_type="rmsnorm", norm_eps=c.rms_norm_eps)
    return SpikeLMConfig(vocab_size=c.vocab_size, time_steps=time_steps, attention_type=attention_type,
                         bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                         **shape)


def _copy_norm(target, source):
    target.weight.copy_(source.weight)
    if getattr(target, "bias", None) is not None:
        if getattr(source, "bias", None) is not None:
            target.bias.copy_(source.bias)
        else:
            target.bias.zero_()


def _repeat_heads(weight, heads, head_dim):
    """[kv_heads * d, D] -> [heads * d, D]: each grouped K/V head serves heads / kv_heads query heads."""
    kv_heads = weight.shape[0] // head_dim
    return weight.view(kv_heads, head_dim, -1).repeat_interleave(heads // kv_heads, 0).reshape(heads * head_dim, -1)


@torch.no_grad()
def copy_teacher_weights(teacher, twin):
    """Copy into `twin` (a spikelm model of student_config's shape) every teacher weight that has a place."""
    family = _family(teacher)
    D, H = twin.config.hidden_size, twin.config.num_attention_heads
    model = twin.model
    if family == "gpt2":
        body = teacher.transformer
        model.embed_tokens.weight.copy_(body.wte.weight)
        for block, layer in zip(body.h, model.layers):
            q, k, v = block.attn.c_attn.weight.t().split(D, 0)  # Conv1D keeps [in, out]
            _copy_norm(layer.attention_norm, block.ln_1)
            _copy_norm(layer.mlp_norm, block.ln_2)
            layer.attention.o_proj.weight.copy_(block.attn.c_proj.weight.t())
            layer.mlp.fc_in.weight.copy_(block.mlp.c_fc.weight.t())
            layer.mlp.fc_out.weight.copy_(block.mlp.c_proj.weight.t())
            _copy_qkv(layer.attention, q, k, v, D)
        _copy_norm(model.norm, body.ln_f)
    else:
        body = teacher.model
        d = D // H
        model.embed_tokens.weight.copy_(body.embed_tokens.weight)
        for block, layer in zip(body.layers, model.layers):
            attention = block.self_attn
            _copy_norm(layer.attention_norm, block.input_layernorm)
            _copy_norm(layer.mlp_norm, block.post_attention_layernorm)
            layer.attention.o_proj.weight.copy_(attention.o_proj.weight)
            layer.mlp.fc_in.weight.copy_(block.mlp.gate_proj.weight)
            layer.mlp.fc_out.weight.copy_(block.mlp.down_proj.weight)
            _copy_qkv(layer.attention, attention.q_proj.weight, _repeat_heads(attention.k_proj.weight, H, d),
                      _repeat_heads(attention.v_proj.weight, H, d), D)
        _copy_norm(model.norm, body.norm)
    twin.lm_head.weight.copy_(teacher.get_output_embeddings().weight)
    return twin


def _copy_qkv(attention, q, k, v, D):
    attention.q_proj.weight.copy_(q)
    attention.kv_proj.weight.zero_()  # the token-shift half (columns D:) starts at zero
    attention.kv_proj.weight[:D, :D].copy_(k)
    attention.kv_proj.weight[D:, :D].copy_(v)


def _activation_sites(teacher):
    """(teacher module, 'out' or 'in', which part, twin neuron path) for every neuron population."""
    family = _family(teacher)
    sites = []
    if family == "gpt2":
        blocks, final = teacher.transformer.h, teacher.transformer.ln_f
        for i, block in enumerate(blocks):
            prefix = f"model.layers.{i}"
            sites += [(block.ln_1, "out", None, f"{prefix}.attention_neuron"),
                      (block.attn.c_attn, "out", 0, f"{prefix}.attention.q_neuron"),
                      (block.attn.c_attn, "out", 1, f"{prefix}.attention.k_neuron"),
                      (block.attn.c_attn, "out", 2, f"{prefix}.attention.v_neuron"),
                      (block.attn.c_proj, "in", None, f"{prefix}.attention.readout_neuron"),
                      (block.ln_2, "out", None, f"{prefix}.mlp_neuron"),
                      (block.mlp.c_fc, "out", None, f"{prefix}.mlp.hidden_neuron")]
    else:
        blocks, final = teacher.model.layers, teacher.model.norm
        for i, block in enumerate(blocks):
            prefix = f"model.layers.{i}"
            attention = block.self_attn
            sites += [(block.input_layernorm, "out", None, f"{prefix}.attention_neuron"),
                      (attention.q_proj, "out", None, f"{prefix}.attention.q_neuron"),
                      (attention.k_proj, "out", None, f"{prefix}.attention.k_neuron"),
                      (attention.v_proj, "out", None, f"{prefix}.attention.v_neuron"),
                      (attention.o_proj, "in", None, f"{prefix}.attention.readout_neuron"),
                      (block.post_attention_layernorm, "out", None, f"{prefix}.mlp_neuron"),
                      (block.mlp.gate_proj, "out", None, f"{prefix}.mlp.hidden_neuron")]
    sites.append((final, "out", None, "model.output_neuron"))
    return sites


@torch.no_grad()
def activation_clips(teacher, batches) -> dict:
    """{twin neuron path: the 99.9th percentile of the positive teacher activations at its place}."""
    teacher.eval()
    sites = _activation_sites(teacher)
    values = {path: [] for *_, path in sites}
    width = teacher.get_input_embeddings().weight.shape[1]

    def recorder(kind, part, path):
        def record(module, inputs, output):
            x = inputs[0] if kind == "in" else output
            x = x[0] if isinstance(x, tuple) else x
            if part is not None:
                x = x.split(width, -1)[part]
            values[path].append(x.detach().float().flatten())
        return record

    handles = [module.register_forward_hook(recorder(kind, part, path)) for module, kind, part, path in sites]
    try:
        for input_ids in batches:
            teacher(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    clips = {}
    generator = torch.Generator().manual_seed(0)
    for path, parts in values.items():
        x = torch.cat(parts)
        x = x[x > 0]
        if len(x) > SAMPLED_VALUES:
            x = x[torch.randperm(len(x), generator=generator)[:SAMPLED_VALUES]]
        clips[path] = max(float(torch.quantile(x, PERCENTILE)) if len(x) else 1.0, 1e-3)
    return clips


def init_from_teacher(teacher, batches, time_steps=4, attention_type="ssa") -> SpikeLMForCausalLM:
    """A spiking (IF, T = time_steps) spikelm model with the teacher's weights and balanced thresholds.
    batches: a few [B, N] token-id tensors of the training text, for the activation statistics."""
    twin = SpikeLMForCausalLM(ann_twin_config(student_config(teacher, time_steps, attention_type)))
    copy_teacher_weights(teacher, twin)
    clips = activation_clips(teacher, batches)
    with torch.no_grad():
        for path, clip in clips.items():
            twin.get_submodule(path).clip.fill_(clip)
    return convert_to_snn(twin.eval())
