"""SpikeLM: a spike-driven Transformer decoder, as a Hugging Face causal language model.

Shapes: T spiking time steps, B batch, N tokens, D width, H heads, d = D / H.
Time comes first in every spiking tensor: [T, B, N, D].

The model (docs/design.md), after Spikformer (Zhou et al. 2023), the
Spike-driven Transformer (Yao et al. 2023), SpikeGPT (Zhu et al. 2023) and
RetNet's decayed linear attention (Sun et al. 2023):

    x = embedding(tokens), the same input current at each of the T steps
    x = x + Attn(SN(norm(x)))                   membrane shortcut: x stays real
    x = x + W2 . SN(W1 . SN(norm(x)))
    logits = mean over t of W_head . SN(norm(x))[t]

Every weight matrix receives spikes (exactly 0 or 1). Attention is softmax-free
and causal; its parallel form trains, its recurrent form generates with a
fixed-size state (SpikeLMCache), so a token costs the same at position 10 as at
position 10,000.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from .configuration_spikelm import SpikeLMConfig
from .neurons import QCFSActivation, SpikingNeuron

# The parallel form runs over chunks of this many tokens, carrying the recurrent
# state between them: memory stays O(chunk^2) however long the prompt.
ATTENTION_CHUNK = 256


# ================================================================ causal spike attention (pure functions)


def decay_weights(decay, n):
    """gamma_h^(i-j) for j <= i, else 0. decay: [H] -> [H, n, n]."""
    position = torch.arange(n, device=decay.device)
    distance = position[:, None] - position[None, :]  # i - j
    weights = torch.exp(distance.clamp(min=0).to(decay.dtype) * torch.log(decay)[:, None, None])
    return weights * (distance >= 0)


def decay_sums(decay, n, mask, previous_sum):
    """Running decay sum z_i = gamma * z_{i-1} + m_i over a chunk. -> [B, H, n]."""
    weights = decay_weights(decay, n)  # [H, n, n]
    within = torch.einsum("hij,bj->bhi", weights, mask)
    carried = decay[None, :, None] ** torch.arange(1, n + 1, device=decay.device)[None, None, :]
    return within + carried * previous_sum[:, :, None]


def ssa_parallel(q, k, v, decay, scale, mask, state):
    """Spike self-attention over a chunk of n tokens, parallel form, continuing from a recurrent state.

    q, k, v: [T, B, H, n, d] spikes (k, v already zero at padded positions); decay: [H]; mask: [B, n].
    state: (S [T, B, H, d, d], z [B, H]). Returns the read-out [T, B, H, n, d] and the new state.
        a_i = scale * (sum_{j<=i} gamma^(i-j) (q_i . k_j) v_j + gamma^(i+1) q_i S) / z_i
    """
    S, z = state
    n = q.shape[-2]
    weights = decay_weights(decay, n)  # [H, n, n]
    coincidences = q @ k.transpose(-1, -2)  # [T, B, H, n, n]: counts of coinciding spikes
    readout = (coincidences * weights) @ v
    carried = decay[:, None] ** torch.arange(1, n + 1, device=decay.device)  # gamma^(i+1): [H, n]
    readout = readout + carried[..., None] * (q @ S)
    z_all = decay_sums(decay, n, mask, z)  # [B, H, n]
    # new state: S' = gamma^n S + sum_j gamma^(n-1-j) k_j v_j^T
    to_end = decay[:, None] ** torch.arange(n - 1, -1, -1, device=decay.device)  # [H, n]
    S = (decay ** n)[:, None, None] * S + (k * to_end[..., None]).transpose(-1, -2) @ v
    return scale * readout * _inverse(z_all)[None, ..., None], (S, z_all[..., -1])


def ssa_recurrent(q, k, v, decay, scale, mask, state):
    """One token, recurrent form. q, k, v: [T, B, H, d]; mask: [B]. The readable reference for decoding.
        S_i = gamma S_{i-1} + k_i v_i^T ;  z_i = gamma z_{i-1} + 1 ;  a_i = scale * q_i S_i / z_i
    """
    S, z = state
    S = decay[:, None, None] * S + k[..., :, None] * v[..., None, :]
    z = decay * z + mask[:, None]
    readout = (q[..., None, :] @ S).squeeze(-2)
    return scale * readout * _inverse(z)[None, ..., None], (S, z)


def sdsa_parallel(k, v, decay, mask, state):
    """Channel-wise spike-driven attention (after the Spike-driven Transformer's SDSA), parallel form.

    Returns the decayed running mean of k * v per channel, r_i = sum_{j<=i} gamma^(i-j) k_j v_j / z_i,
    [T, B, H, n, d], which a neuron thresholds and q masks. state: (S [T, B, H, d], z [B, H]).
    """
    S, z = state
    n = k.shape[-2]
    coincidences = k * v  # [T, B, H, n, d]
    running = decay_weights(decay, n) @ coincidences
    carried = decay[:, None] ** torch.arange(1, n + 1, device=decay.device)
    running = running + carried[..., None] * S[..., None, :]
    z_all = decay_sums(decay, n, mask, z)
    to_end = decay[:, None] ** torch.arange(n - 1, -1, -1, device=decay.device)
    S = (decay ** n)[:, None] * S + (coincidences * to_end[..., None]).sum(-2)
    return running * _inverse(z_all)[None, ..., None], (S, z_all[..., -1])


def sdsa_recurrent(k, v, decay, mask, state):
    """One token, recurrent form. k, v: [T, B, H, d]; mask: [B]."""
    S, z = state
    S = decay[:, None] * S + k * v
    z = decay * z + mask[:, None]
    return S * _inverse(z)[None, ..., None], (S, z)


def _inverse(z):
    # 1 / z where some token has been seen; 0 before (a padded prefix reads out nothing)
    return torch.where(z > 0, 1.0 / z.clamp(min=1e-30), torch.zeros_like(z))


# ================================================================ recurrent state for generate()


class SpikeLMStateLayer:
    """One layer's recurrent state: the attention state, the decay sum and the last token's spikes.

    Its size does not depend on how many tokens it has seen: T*H*d*d (ssa) or T*D (sdsa) numbers for the
    attention state, B*H for the decay sum and T*B*D for the token shift.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False
    is_initialized = True

    def __init__(self):
        self.has_previous_state = {0: False}
        self.attention_state = None  # [T, B, H, d, d] or [T, B, H, d]
        self.decay_sum = None  # [B, H]
        self.previous_spikes = None  # [T, B, D]

    def tensors(self):
        return [t for t in (self.attention_state, self.decay_sum, self.previous_spikes) if t is not None]

    def _map_batch(self, fn):
        # attention state and token-shift spikes carry the batch in dim 1, the decay sum in dim 0
        if self.attention_state is not None:
            self.attention_state = fn(self.attention_state, 1)
            self.previous_spikes = fn(self.previous_spikes, 1)
            self.decay_sum = fn(self.decay_sum, 0)

    def reorder_cache(self, beam_idx):
        self._map_batch(lambda t, dim: t.index_select(dim, beam_idx.to(t.device)))

    def batch_select_indices(self, indices):
        self._map_batch(lambda t, dim: t.index_select(dim, indices.to(t.device)))

    def batch_repeat_interleave(self, repeats):
        self._map_batch(lambda t, dim: t.repeat_interleave(repeats, dim=dim))

    def reset(self):
        self.attention_state = self.decay_sum = self.previous_spikes = None

    def crop(self, tokens_to_remove):
        raise NotImplementedError("A recurrent spiking state cannot be cropped: it does not keep past tokens.")

    def offload(self):
        pass

    def prefetch(self):
        pass

    def get_seq_length(self):
        return 0

    def get_max_length(self):
        return -1


class SpikeLMCache(Cache):
    """The recurrent state of every layer, a fixed size whatever the context length."""

    def __init__(self, config: SpikeLMConfig):
        super().__init__(layers=[SpikeLMStateLayer() for _ in range(config.num_hidden_layers)])
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reset(self):
        for layer in self.layers:
            layer.reset()
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("A recurrent spiking state cannot be cropped: it does not keep past tokens.")

    def state_size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())


# ================================================================ layers


def make_neuron(config):
    """A spiking neuron population, or in the ANN twin (neuron_type "qcfs") its quantised stand-in."""
    return QCFSActivation(config) if config.neuron_type == "qcfs" else SpikingNeuron(config)


class SpikeLMRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(config):
    if config.norm_type == "rmsnorm":
        return SpikeLMRMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class SpikeLMAttention(nn.Module):
    """Causal softmax-free spike attention, "ssa" or "sdsa". Input: spikes [T, B, N, D]."""

    def __init__(self, config: SpikeLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.kind = config.attention_type
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.token_shift = config.token_shift
        D = config.hidden_size
        # The read-out is a decayed mean of (q . k) v: about d r^3 for spikes firing at rate r. 64 / d brings
        # rates near 1/4 to the threshold; 1 / sqrt(d) left the read-out neurons silent and the copy task
        # unlearnt (see tests/test_copy_task.py). "sdsa" reads out a mean in [0, 1] and needs no scale.
        scale = config.attention_scale
        if isinstance(scale, list):
            scale = scale[layer_idx]
        self.scale = scale or (64.0 / self.head_dim if self.kind == "ssa" else 1.0)
        self.q_proj = nn.Linear(D, D, bias=False)
        # K and V read the current token's spikes and, with token shift, the previous token's (a width-2 causal
        # convolution on spikes): [s_i ; s_{i-1}] -> [k ; v]
        self.kv_proj = nn.Linear(2 * D if self.token_shift else D, 2 * D, bias=False)
        self.q_neuron = make_neuron(config)
        self.k_neuron = make_neuron(config)
        self.v_neuron = make_neuron(config)
        self.readout_neuron = make_neuron(config)  # ssa: spikes from a; sdsa: thresholds the running mean
        self.o_proj = nn.Linear(D, D, bias=False)
        self.fixed_decay = [float(g) for g in config.attention_decay]  # plain numbers unless learned
        if config.learn_decay:
            # gamma = sigmoid(w) keeps each decay in (0, 1)
            self.decay_logit = nn.Parameter(torch.logit(torch.tensor(self.fixed_decay).clamp(max=1 - 1e-4)))
        else:
            self.decay_logit = None
        self.counter = None  # set by spikelm.energy while counting

    def decay(self, like):
        if self.decay_logit is not None:
            return torch.sigmoid(self.decay_logit).to(like.dtype)
        return torch.tensor(self.fixed_decay, dtype=like.dtype, device=like.device)

    def _heads(self, x):  # [T, B, n, D] -> [T, B, H, n, d]
        T, B, n, _ = x.shape
        return x.view(T, B, n, self.num_heads, self.head_dim).transpose(2, 3)

    def forward(self, spikes, mask, state: SpikeLMStateLayer | None, recurrent: bool):
        """spikes: [T, B, n, D]; mask: [B, n] (1 for real tokens); state: carried in and updated in place."""
        T, B, n, D = spikes.shape
        dtype = spikes.dtype
        spikes = spikes * mask[None, :, :, None]  # padded positions send nothing
        q = self.q_neuron(self.q_proj(spikes))
        if self.token_shift:
            previous = state.previous_spikes if state is not None and state.previous_spikes is not None else \
                spikes.new_zeros(T, B, 1, D)
            previous = previous.view(T, B, 1, D)
            shifted = torch.cat([previous, spikes[:, :, :-1]], dim=2)  # the previous token's spikes
            kv_in = torch.cat([spikes, shifted], dim=-1)
        else:
            shifted, kv_in = None, spikes
        k, v = self.kv_proj(kv_in).chunk(2, dim=-1)
        k = self.k_neuron(k) * mask[None, :, :, None]
        v = self.v_neuron(v) * mask[None, :, :, None]

        decay = self.decay(spikes)
        H, d = self.num_heads, self.head_dim
        if state is not None and state.attention_state is not None:
            carried = (state.attention_state, state.decay_sum)
        else:
            shape = (T, B, H, d, d) if self.kind == "ssa" else (T, B, H, d)
            carried = (spikes.new_zeros(shape), spikes.new_zeros(B, H))
        mask = mask.to(dtype)
        if self.kind == "ssa":
            heads = [self._heads(x) for x in (q, k, v)]  # [T, B, H, n, d] each
            parallel = lambda xs, m, c: ssa_parallel(*xs, decay, self.scale, m, c)  # noqa: E731
            step = lambda xs, m, c: ssa_recurrent(*xs, decay, self.scale, m, c)  # noqa: E731
        else:
            heads = [self._heads(x) for x in (k, v)]
            parallel = lambda xs, m, c: sdsa_parallel(*xs, decay, m, c)  # noqa: E731
            step = lambda xs, m, c: sdsa_recurrent(*xs, decay, m, c)  # noqa: E731
        if recurrent:
            out, carried = step([x[..., 0, :] for x in heads], mask[:, 0], carried)
            out = out[..., None, :]
        else:
            outs = []
            for start in range(0, n, ATTENTION_CHUNK):
                part = slice(start, start + ATTENTION_CHUNK)
                out, carried = parallel([x[..., part, :] for x in heads], mask[:, part], carried)
                outs.append(out)
            out = torch.cat(outs, dim=-2)
        out = out.transpose(2, 3).reshape(T, B, n, D)
        if self.kind == "ssa":
            attended = self.readout_neuron(out)
        else:  # the thresholded running mean, masked by q
            attended = q * self.readout_neuron(self.scale * out if self.scale != 1.0 else out)
        if self.counter is not None:
            self.counter.attention(self, q, k, v, mask, attended)
        if state is not None:
            state.attention_state, state.decay_sum = carried
            state.previous_spikes = spikes[:, :, -1]
        return self.o_proj(attended)


class SpikeLMMLP(nn.Module):
    """Two weight matrices with a spiking neuron between them; both are fed spikes."""

    def __init__(self, config: SpikeLMConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.hidden_neuron = make_neuron(config)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, spikes):
        return self.fc_out(self.hidden_neuron(self.fc_in(spikes)))


class SpikeLMBlock(nn.Module):
    """Membrane shortcut: the residual stream stays real; each branch starts with a spiking neuron."""

    def __init__(self, config: SpikeLMConfig, layer_idx: int):
        super().__init__()
        self.attention_norm = make_norm(config)
        self.attention_neuron = make_neuron(config)
        self.attention = SpikeLMAttention(config, layer_idx)
        self.mlp_norm = make_norm(config)
        self.mlp_neuron = make_neuron(config)
        self.mlp = SpikeLMMLP(config)

    def forward(self, membrane, mask, state=None, recurrent=False):
        membrane = membrane + self.attention(self.attention_neuron(self.attention_norm(membrane)), mask, state,
                                             recurrent)
        return membrane + self.mlp(self.mlp_neuron(self.mlp_norm(membrane)))


# ================================================================ models


@dataclass
class SpikeLMModelOutput(BaseModelOutputWithPast):
    """`last_hidden_state` [B, N, D] is the output neurons' firing rate; `spikes` [T, B, N, D] their spikes."""

    spikes: torch.FloatTensor | None = None


class SpikeLMPreTrainedModel(PreTrainedModel):
    config_class = SpikeLMConfig
    config: SpikeLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["SpikeLMBlock"]
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own SpikeLMCache

    def _init_weights(self, module):
        """All initialisation in one place.

        Weight matrices fed spikes get std 1 / sqrt(fan_in): with firing rates near 0.2 to 0.3 the currents
        then reach the threshold often enough for the next neurons to fire. Matrices that write into the
        residual stream are scaled down by sqrt(2 * layers), as in GPT-2. The embedding is the input current.
        """
        config = self.config
        if isinstance(module, nn.Linear):
            std = 1.0 / math.sqrt(module.in_features)
            if getattr(module, "_writes_residual", False):
                std /= math.sqrt(2 * config.num_hidden_layers)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=config.initializer_range)
        elif isinstance(module, (nn.LayerNorm, SpikeLMRMSNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, QCFSActivation):
            init.constant_(module.clip, config.threshold)
        elif isinstance(module, SpikingNeuron) and module.leak_logit is not None:
            leak = config.leak_value
            init.constant_(module.leak_logit, math.log(leak / (1 - leak)) if leak < 1 else 8.0)
        elif isinstance(module, SpikeLMAttention) and module.decay_logit is not None:
            init.copy_(module.decay_logit, torch.logit(torch.tensor(module.fixed_decay).clamp(max=1 - 1e-4)))


class SpikeLMModel(SpikeLMPreTrainedModel):
    """The decoder without its head: token ids -> output spikes [T, B, N, D]."""

    def __init__(self, config: SpikeLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(SpikeLMBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self.output_neuron = make_neuron(config)
        for layer in self.layers:
            layer.attention.o_proj._writes_residual = True
            layer.mlp.fc_out._writes_residual = True
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, cache=None, use_cache=None, inputs_embeds=None,
                **kwargs) -> SpikeLMModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("SpikeLMModel: pass exactly one of input_ids [B, N] and inputs_embeds [B, N, D].")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"SpikeLMModel expects input_ids of shape [B, N], got {tuple(input_ids.shape)}")
            inputs_embeds = self.embed_tokens(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"SpikeLMModel expects inputs_embeds of shape [B, N, {self.config.hidden_size}], "
                             f"got {tuple(inputs_embeds.shape)}")
        B, n, D = inputs_embeds.shape
        use_cache = (use_cache if use_cache is not None else self.config.use_cache) and not self.training
        if use_cache and cache is None:
            cache = SpikeLMCache(self.config)
        if not use_cache:
            cache = None
        if attention_mask is None:
            mask = inputs_embeds.new_ones(B, n)
        else:
            # generate() passes the mask of the whole sequence so far; this call needs its last n columns
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < n:
                raise ValueError(f"SpikeLMModel expects attention_mask of shape [B={B}, >= {n}], "
                                 f"got {tuple(attention_mask.shape)}")
            mask = attention_mask[:, -n:].to(inputs_embeds.dtype)
        if cache is not None and n > ATTENTION_CHUNK and not torch.is_grad_enabled():
            # A long prompt with a state to fill: the whole stack runs chunk by chunk, carrying the state, so
            # the memory of a prefill does not grow with its length.
            spikes = torch.cat([self._stack(inputs_embeds[:, start:start + ATTENTION_CHUNK],
                                            mask[:, start:start + ATTENTION_CHUNK], cache)
                                for start in range(0, n, ATTENTION_CHUNK)], dim=2)
        else:
            spikes = self._stack(inputs_embeds, mask, cache)
        return SpikeLMModelOutput(last_hidden_state=spikes.mean(0), cache=cache, spikes=spikes)

    def _stack(self, inputs_embeds, mask, cache):
        """Embeddings [B, n, D] -> output spikes [T, B, n, D], continuing from and updating `cache`."""
        B, n, D = inputs_embeds.shape
        # One token with a state to continue from: the recurrent form. Otherwise the (chunked) parallel form.
        recurrent = cache is not None and n == 1 and cache.seen_tokens > 0
        membrane = inputs_embeds.unsqueeze(0).expand(self.config.time_steps, B, n, D)  # input current at each step
        for i, block in enumerate(self.layers):
            membrane = block(membrane, mask, cache.layers[i] if cache is not None else None, recurrent)
        spikes = self.output_neuron(self.norm(membrane))
        if cache is not None:
            cache.seen_tokens += n
        return spikes


class SpikeLMForCausalLM(SpikeLMPreTrainedModel, GenerationMixin):
    """SpikeLM with its LM head: logits are the mean over T of the head applied to the output spikes."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SpikeLMConfig):
        super().__init__(config)
        self.model = SpikeLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.counter = None  # set by spikelm.energy while counting
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(self, input_ids=None, attention_mask=None, cache=None, labels=None, use_cache=None,
                inputs_embeds=None, logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        if labels is not None and use_cache is None:
            use_cache = False  # scoring (training, evaluation) needs no recurrent state
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=use_cache,
                             inputs_embeds=inputs_embeds)
        spikes = outputs.spikes
        if logits_to_keep:
            spikes = spikes[:, :, -logits_to_keep:]
        # [B, N, V]: the mean over the T steps of the head fed each step's spikes, accumulated step by step so
        # that a long prompt never holds T copies of its logits
        logits = self.lm_head(spikes[:1])[0]
        for t in range(1, spikes.shape[0]):
            logits = logits + self.lm_head(spikes[t:t + 1])[0]
        logits = logits / spikes.shape[0]
        if self.counter is not None:
            self.counter.head_average(self, logits)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)


__all__ = ["SpikeLMCache", "SpikeLMForCausalLM", "SpikeLMModel", "SpikeLMPreTrainedModel"]
