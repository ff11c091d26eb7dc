"""SpikeLM: a spike-driven Transformer decoder, as a Hugging Face causal language model.

Shapes: T spiking time steps, B batch, N tokens, D width, H heads, d = D / H.
Time comes first in every spiking tensor: [T, B, N, D].

The model (docs/design.md), after Spikformer (Zhou et al. 2023), the
Spike-driven Transformer (Yao et al. 2023), SpikeGPT (Zhu et al. 2023) and
RetNet's decayed linear attention (Sun et al. 2023):

    x = embedding(tokens), the same input current at each of the T steps
    x = x + Attn(SN(norm(x)))                   membrane shortcut: x stays real
    x = x + W2 . SN(W1 . SN(norm(x)))
    logits = mean over t of W_head . SN(norm(x))[t] = W_head . (sum over t of SN(norm(x))[t]) / T

Every weight matrix receives spikes (exactly 0 or 1). Attention is softmax-free
and causal; its parallel form trains, its recurrent form generates with a
fixed-size state (SpikeLMCache), so a token costs the same at position 10 as at
position 10,000.
"""

import copy
import inspect
import math
import weakref
from collections.abc import Callable
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
from .event_driven import SpikeLinear
from .kernels import ssa_counts as ssa_counts_kernel
from .kernels import ssa_step as ssa_step_kernel
from .kernels import supports as kernel_supports
from .neurons import QCFSActivation, SpikingNeuron, leak_logit

# A long prompt with a cache to fill runs through the stack in chunks of this many tokens, carrying the recurrent
# state between them: memory stays O(chunk^2) however long the prompt.
ATTENTION_CHUNK = 256
# Within a layer, the attention's parallel form runs over blocks of this many tokens, carrying the state between
# them: an n-token block costs ~n^2 d per (step, head) and the carried state ~n d^2, so at head width d = 64 a block
# of 64 does half the work of one of 256. Training steps (D=256, 4 layers, 8 x 256 tokens, one thread,
# 2026-12-02): 1.98 s with blocks of 64, 2.16 s with 128, 2.26 s with 256, 2.20 s with 32.
ATTENTION_BLOCK = 64
# A learned or gated decay is sigmoid(logit); a decay of 1 (no forgetting) has no finite logit, so it starts here.
MAX_INITIAL_DECAY = 1 - 1e-4
# std of the gate's matrix W_g: small, so that every gate starts near its head's fixed decay
GATE_INIT_STD = 0.02
# SpikeLMModel -> its compiled one-token step (compile_decode); kept outside the module so that copying, saving
# and pickling a model never meet a compiled function
_COMPILED_DECODE = weakref.WeakKeyDictionary()


# ================================================================ causal spike attention (pure functions)
#
# Decays arrive per token: `log_decay` [B or 1, H, n] holds log g_i for each head and token of a chunk, so that
# one set of functions serves a fixed decay (g_i = gamma, the same at every token) and a gated one
# (g_i = sigmoid(W_g s_i + b), read from the attention's input spikes). With A_i = sum_{j<=i} log g_j, the
# product of the decays between two tokens is exp(A_i - A_j) (cumulative log-decays, as in gated linear
# attention, Yang et al. 2024), which for a fixed decay is gamma^(i-j).

# Below this, 1 / z is taken as 0: no token has been seen yet (a padded prefix reads out nothing).
MIN_DECAY_SUM = 1e-30


def decay_weights(log_decay, n):
    """prod_{j<l<=i} g_l = exp(A_i - A_j) for j <= i, else 0. log_decay: [B', H, n] -> [B', H, n, n]."""
    cumulative = log_decay.cumsum(-1)  # A: [B', H, n]
    causal = torch.ones(n, n, dtype=torch.bool, device=log_decay.device).tril()
    difference = cumulative[..., :, None] - cumulative[..., None, :]  # A_i - A_j
    return torch.exp(difference.masked_fill(~causal, float("-inf")))  # the mask first: exp(+large) overflows


def _carried_and_to_end(log_decay):
    """From a chunk's log-decays [B', H, n]: what the carried-in state is multiplied by at token i,
    prod_{l<=i} g_l, and what token j's contribution is multiplied by at the chunk's end, prod_{j<l<n} g_l."""
    cumulative = log_decay.cumsum(-1)
    return torch.exp(cumulative), torch.exp(cumulative[..., -1:] - cumulative)


def decay_sums(log_decay, mask, previous_sum):
    """Running decay sum z_i = g_i z_{i-1} + m_i over a chunk. mask: [B, n]; previous_sum: [B, H] (None: 0)
    -> [B, H, n]."""
    within = (decay_weights(log_decay, mask.shape[-1]) * mask[:, None, None, :]).sum(-1)
    if previous_sum is None:
        return within.expand(mask.shape[0], *within.shape[1:])
    carried, _ = _carried_and_to_end(log_decay)
    return within + carried * previous_sum[:, :, None]


def ssa_parallel(q, k, v, log_decay, scale, mask, state, keep_state=True):
    """Spike self-attention over a chunk of n tokens, parallel form, continuing from a recurrent state.

    q, k, v: [T, B, H, n, d] spikes (k, v already zero at padded positions); log_decay: [B', H, n] (B' = B or 1);
    mask: [B, n]; state: (S [T, B, H, d, d], z [B, H]), or None for none yet (zeros, whose terms are skipped).
    Returns the read-out [T, B, H, n, d] and the new state (None where not `keep_state`: training's last chunk).
        a_i = scale * (sum_{j<=i} (prod_{j<l<=i} g_l) (q_i . k_j) v_j + (prod_{l<=i} g_l) q_i S) / z_i
    """
    S, z = state if state is not None else (None, None)
    weights = decay_weights(log_decay, q.shape[-2])  # [B', H, n, n]
    coincidences = q @ k.transpose(-1, -2)  # [T, B, H, n, n]: counts of coinciding spikes
    readout = (coincidences * weights) @ v
    carried, to_end = _carried_and_to_end(log_decay)  # [B', H, n] each
    if S is not None:
        readout = readout + carried[..., None] * (q @ S)
    z_all = decay_sums(log_decay, mask, z)  # [B, H, n]
    readout = scale * readout * _inverse(z_all)[None, ..., None]
    if not keep_state:
        return readout, None
    # new state: S' = (prod of the chunk's g) S + sum_j (prod_{l>j} g_l) k_j v_j^T
    new_S = (k * to_end[..., None]).transpose(-1, -2) @ v
    if S is not None:
        new_S = carried[..., -1, None, None] * S + new_S
    return readout, (new_S, z_all[..., -1])


def ssa_recurrent(q, k, v, decay, scale, mask, state):
    """One token, recurrent form. q, k, v: [T, B, H, d]; decay: this token's g, [B', H]; mask: [B].
    The readable reference for decoding.
        S_i = g_i S_{i-1} + k_i v_i^T ;  z_i = g_i z_{i-1} + 1 ;  a_i = scale * q_i S_i / z_i
    """
    S, z = state
    if torch.is_grad_enabled():
        S = decay[..., None, None] * S + k[..., :, None] * v[..., None, :]
        readout = (q[..., None, :] @ S).squeeze(-2)
    elif kernel_supports(S) and S.is_contiguous():  # decoding on the CPU: one C pass over the state, in place
        readout, z = ssa_step_kernel(S, q, k, v, decay, z, mask, scale, MIN_DECAY_SUM)
        return readout, (S, z)
    else:  # decoding: the state is updated in place (no [T, B, H, d, d] temporaries), as a KV cache grows in place
        S = _decay_(S, decay[..., None, None])
        S.view(-1, *S.shape[-2:]).baddbmm_(k.reshape(-1, k.shape[-1], 1), v.reshape(-1, 1, v.shape[-1]))
        readout = (q[..., None, :] @ S).squeeze(-2)
    z = decay * z + mask[:, None]
    return scale * readout * _inverse(z)[None, ..., None], (S, z)


def _decay_(state, decay):
    """state * decay, in place where the state is a plain tensor of its own (not a broadcast view)."""
    return state.mul_(decay) if state.is_contiguous() else state * decay


def sdsa_parallel(k, v, log_decay, mask, state, keep_state=True):
    """Channel-wise spike-driven attention (after the Spike-driven Transformer's SDSA), parallel form.

    Returns the decayed running mean of k * v per channel, r_i = sum_{j<=i} (prod_{j<l<=i} g_l) k_j v_j / z_i,
    [T, B, H, n, d], which a neuron thresholds and q masks. state: (S [T, B, H, d], z [B, H]), or None (zeros);
    the new state is None where not `keep_state`.
    """
    S, z = state if state is not None else (None, None)
    coincidences = k * v  # [T, B, H, n, d]
    running = decay_weights(log_decay, k.shape[-2]) @ coincidences
    carried, to_end = _carried_and_to_end(log_decay)
    if S is not None:
        running = running + carried[..., None] * S[..., None, :]
    z_all = decay_sums(log_decay, mask, z)
    running = running * _inverse(z_all)[None, ..., None]
    if not keep_state:
        return running, None
    new_S = (coincidences * to_end[..., None]).sum(-2)
    if S is not None:
        new_S = carried[..., -1, None] * S + new_S
    return running, (new_S, z_all[..., -1])


def sdsa_recurrent(k, v, decay, mask, state):
    """One token, recurrent form. k, v: [T, B, H, d]; decay: [B', H]; mask: [B]."""
    S, z = state
    if torch.is_grad_enabled():
        S = decay[..., None] * S + k * v
    else:  # decoding: in place
        S = _decay_(S, decay[..., None]).addcmul_(k, v)
    z = decay * z + mask[:, None]
    return S * _inverse(z)[None, ..., None], (S, z)


def _inverse(z):
    # 1 / z where some token has been seen; 0 before (a padded prefix reads out nothing)
    return torch.where(z > 0, 1.0 / z.clamp(min=MIN_DECAY_SUM), torch.zeros_like(z))


# ---------------------------------------------------------------- the attention kinds, as data


def _ssa_ops(q, k, v, heads, head_dim):
    """Per batch row of ssa's recurrent form over spikes q, k, v [T, B, n, D]: (ACs, a list of B ints; MACs, an
    int, the same for every row)."""
    from .energy import ssa_ops  # the rule lives with the other energy rules (energy imports this module)

    T, B, n, D = q.shape
    if kernel_supports(q):  # one C pass (a decode step counts three layers' attention every token)
        pairs, q_spikes = ssa_counts_kernel(q, k, v, heads)
    else:
        k_count = k.reshape(T, B, n, heads, head_dim).sum(-1).long()
        v_count = v.reshape(T, B, n, heads, head_dim).sum(-1).long()
        pairs = (k_count * v_count).sum(dim=(0, 2, 3)).tolist()  # one AC per (k, v) spike pair
        q_spikes = q.reshape(T, B, -1).count_nonzero(-1).sum(0).tolist()
    mac = ssa_ops(T, heads, head_dim, n, 0, 0)[1]
    return [ssa_ops(T, heads, head_dim, n, p, s)[0] for p, s in zip(pairs, q_spikes)], mac


def _sdsa_ops(q, k, v, heads, head_dim):
    """Per batch row of sdsa's recurrent form: (ACs, a list of B ints; MACs, an int)."""
    from .energy import sdsa_ops

    T, B, n, D = q.shape
    coincidences = (k * v).reshape(T, B, -1).count_nonzero(-1).sum(0).tolist()
    return [sdsa_ops(T, heads, D, n, c)[0] for c in coincidences], sdsa_ops(T, heads, D, n, 0)[1]


def _sdsa_parallel_kind(q, k, v, log_decay, scale, mask, state, keep_state=True):
    return sdsa_parallel(k, v, log_decay, mask, state, keep_state)


def _sdsa_recurrent_kind(q, k, v, decay, scale, mask, state):
    return sdsa_recurrent(k, v, decay, mask, state)


@dataclass(frozen=True)
class AttentionKind:
    """What differs between attention kinds, looked up once per layer (config.attention_type)."""

    name: str
    parallel: Callable  # (q, k, v [T, B, H, n, d], log_decay, scale, mask, state or None, keep_state) -> (out, state)
    recurrent: Callable  # (q, k, v [T, B, H, d], decay, scale, mask, state) -> (out, state)
    state_shape: Callable  # (T, B, H, d) -> the attention state's shape (fixed: no token count in it)
    count_ops: Callable  # (q, k, v [T, B, n, D], heads, head_dim) -> (ACs per row [B ints], MACs of each row)
    default_scale: Callable  # head_dim -> read-out scale
    # sdsa: q masks the thresholded running mean (it does not enter the read-out), so on conversion q's clip
    # goes to the output matrix rather than into the scale
    q_masks_readout: bool


ATTENTION_KINDS = {
    # The read-out is a decayed mean of (q . k) v: about d r^3 for spikes firing at rate r. 64 / d brings rates
    # near 1/4 to the threshold; 1 / sqrt(d) left the read-out neurons silent and the copy task unlearnt.
    "ssa": AttentionKind("ssa", ssa_parallel, ssa_recurrent, lambda T, B, H, d: (T, B, H, d, d), _ssa_ops,
                         lambda head_dim: 64.0 / head_dim, q_masks_readout=False),
    # sdsa reads out a mean in [0, 1] and needs no scale
    "sdsa": AttentionKind("sdsa", _sdsa_parallel_kind, _sdsa_recurrent_kind, lambda T, B, H, d: (T, B, H, d),
                          _sdsa_ops, lambda head_dim: 1.0, q_masks_readout=True),
}


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

    # which dimension of each state tensor holds the batch rows
    BATCH_DIMS = {"attention_state": 1, "decay_sum": 0, "previous_spikes": 1}

    def _map_batch(self, fn):
        if self.attention_state is not None:
            for name, dim in self.BATCH_DIMS.items():
                setattr(self, name, fn(getattr(self, name), dim))

    def append_rows(self, other: "SpikeLMStateLayer"):
        """Append the batch rows of `other`'s state after this one's (in place)."""
        if self.attention_state is None:
            for name in self.BATCH_DIMS:
                setattr(self, name, getattr(other, name))
        elif other.attention_state is not None:
            for name, dim in self.BATCH_DIMS.items():
                setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)], dim=dim))

    def __deepcopy__(self, memo):
        """A copy with its own tensors (the prefix cache keeps one per snapshot): tensors cloned directly, not
        through deepcopy's generic walk, which costs a prompt's worth of time per copy."""
        copied = SpikeLMStateLayer()
        copied.has_previous_state = dict(self.has_previous_state)
        for name in self.BATCH_DIMS:
            value = getattr(self, name)
            setattr(copied, name, None if value is None else value.clone())
        memo[id(self)] = copied
        return copied

    def row(self, i: int) -> "SpikeLMStateLayer":
        """Batch row i's state, in tensors of its own."""
        part = SpikeLMStateLayer()
        part.has_previous_state = dict(self.has_previous_state)
        for name, dim in self.BATCH_DIMS.items():
            value = getattr(self, name)
            setattr(part, name, None if value is None else value.narrow(dim, i, 1).clone())
        return part

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

    def __deepcopy__(self, memo):
        copied = copy.copy(self)  # the plain fields; each layer's tensors cloned below
        copied.layers = [copy.deepcopy(layer, memo) for layer in self.layers]
        memo[id(self)] = copied
        return copied

    def append_rows(self, other: "SpikeLMCache") -> "SpikeLMCache":
        """Append the batch rows of `other` (a cache of the same model) after this one's, in place; returns self.
        Rows that have seen different numbers of tokens can share a batch: the state has no token axis."""
        for layer, extra in zip(self.layers, other.layers):
            layer.append_rows(extra)
        self.seen_tokens = max(self.seen_tokens, other.seen_tokens)  # > 0 selects the recurrent form
        return self

    def split_rows(self, seen_tokens: list[int] | None = None) -> list["SpikeLMCache"]:
        """One cache per batch row, each with its own copy of its row's state; `seen_tokens`: each row's count
        (default: this cache's)."""
        rows = self.layers[0].decay_sum.shape[0]
        seen_tokens = seen_tokens or [self.seen_tokens] * rows
        caches = []
        for row, seen in zip(range(rows), seen_tokens):
            cache = copy.copy(self)  # the plain fields; each layer's row below
            cache.layers = [layer.row(row) for layer in self.layers]
            cache.seen_tokens = seen
            caches.append(cache)
        return caches

    def select_rows(self, indices: torch.Tensor) -> "SpikeLMCache":
        """Keep only the batch rows `indices` (in that order), in place; returns self."""
        self.batch_select_indices(indices)
        return self

    def state_size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())


# ================================================================ layers


class SpikeLMRateActivation(nn.Module):
    """The real-valued twin's stand-in for a neuron population (neuron_type "relu"): a ReLU clipped at the
    threshold and divided by it, clamp(x / theta, 0, 1), the firing rate an integrate-and-fire neuron fed a
    constant x reaches over many steps. Input and output are [1, ...] (the twin runs with time_steps=1)."""

    def __init__(self, config):
        super().__init__()
        self.threshold = float(config.threshold)

    def forward(self, x):
        return torch.clamp(x / self.threshold, 0.0, 1.0)


def make_neuron(config):
    """A spiking neuron population, or in an ANN twin its real-valued stand-in: QCFS (quantised, for
    conversion) or the clipped ReLU rate (the architecture without spikes)."""
    if config.neuron_type == "qcfs":
        return QCFSActivation(config)
    if config.neuron_type == "relu":
        return SpikeLMRateActivation(config)
    return SpikingNeuron(config)


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
    """Causal softmax-free spike attention, "ssa" or "sdsa". Input: spikes [T, B, N, D].

    Each head forgets its past by a decay: a fixed gamma_h (config.attention_decay, learnable with learn_decay),
    or with config.gated_decay one per token, g_i = sigmoid(W_g s_i + b_h), read from the attention's input
    spikes by a spike-driven matrix W_g [H, D] (the mean over the T steps of W_g s_i[t], so each spike adds one
    column) with b_h starting at the logit of gamma_h.
    """

    def __init__(self, config: SpikeLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.kind = ATTENTION_KINDS[config.attention_type]
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.token_shift = config.token_shift
        D, H = config.hidden_size, config.num_attention_heads
        scale = config.attention_scale
        if isinstance(scale, list):
            scale = scale[layer_idx]
        self.scale = scale or self.kind.default_scale(self.head_dim)
        self.q_proj = SpikeLinear(D, D)
        # K and V read the current token's spikes and, with token shift, the previous token's (a width-2 causal
        # convolution on spikes): [s_i ; s_{i-1}] -> [k ; v]
        self.kv_proj = SpikeLinear(2 * D if self.token_shift else D, 2 * D)
        self.q_neuron = make_neuron(config)
        self.k_neuron = make_neuron(config)
        self.v_neuron = make_neuron(config)
        self.readout_neuron = make_neuron(config)  # ssa: spikes from a; sdsa: thresholds the running mean
        # K's and V's neurons differ only in name where neither learns its leak: inference fires them in one call
        self.kv_one_population = isinstance(self.k_neuron, SpikingNeuron) and self.k_neuron.leak_logit is None
        self.o_proj = SpikeLinear(D, D)
        self.fixed_decay = [float(g) for g in config.attention_decay]  # plain numbers unless learned or gated
        self._fixed_log_decay = None  # (dtype and device, log of fixed_decay there)
        # gamma = sigmoid(w) keeps each decay in (0, 1); with a gate, w is the gate's bias. Set in _init_weights.
        learned = config.learn_decay or config.gated_decay
        self.decay_logit = nn.Parameter(torch.empty(H)) if learned else None
        self.gate_proj = SpikeLinear(D, H) if config.gated_decay else None  # W_g
        self.counter = None  # set by spikelm.energy while counting

    def log_decays(self, spikes):
        """log g for every head and token: [B, H, n] with a gate, else [1, H, n] (the same at every token).
        spikes: the attention's input [T, B, n, D]."""
        n = spikes.shape[2]
        if self.gate_proj is not None:
            gate_logits = self.gate_proj(spikes).mean(0) + self.decay_logit  # [B, n, H]
            return F.logsigmoid(gate_logits).transpose(1, 2)
        if self.decay_logit is not None:
            log_decay = F.logsigmoid(self.decay_logit).to(spikes.dtype)
        else:  # made once per dtype and device (a decode step asks every layer for it)
            key = (spikes.dtype, spikes.device)
            if self._fixed_log_decay is None or self._fixed_log_decay[0] != key:
                self._fixed_log_decay = (key, torch.log(torch.tensor(self.fixed_decay, dtype=spikes.dtype,
                                                                     device=spikes.device)))
            log_decay = self._fixed_log_decay[1]
        return log_decay[None, :, None].expand(1, self.num_heads, n)

    def count_ops(self, q, k, v):
        """This attention's recurrent form, gate included: (ACs of each batch row, a list; MACs, an int, the same
        for every row)."""
        ac, mac = self.kind.count_ops(q, k, v, self.num_heads, self.head_dim)
        if self.gate_proj is not None:  # W_g's own ACs are counted as any weight matrix's
            from .energy import gate_ops

            gate_ac, gate_mac = gate_ops(q.shape[0], self.num_heads, q.shape[2])
            ac, mac = [row + gate_ac for row in ac], mac + gate_mac
        return ac, mac

    def _heads(self, x):  # [T, B, n, D] -> [T, B, H, n, d]
        T, B, n, _ = x.shape
        return x.view(T, B, n, self.num_heads, self.head_dim).transpose(2, 3)

    def forward(self, spikes, mask, state: SpikeLMStateLayer | None, recurrent: bool, padded: bool = True):
        """spikes: [T, B, n, D]; mask: [B, n] (1 for real tokens); state: carried in and updated in place;
        padded: False where every token is real (the mask then changes nothing and is not multiplied in)."""
        T, B, n, D = spikes.shape
        dtype = spikes.dtype
        if padded:
            spikes = spikes * mask[None, :, :, None]  # padded positions send nothing
        q = self.q_neuron(self.q_proj(spikes))
        if self.token_shift:
            previous = state.previous_spikes if state is not None and state.previous_spikes is not None else \
                spikes.new_zeros(T, B, 1, D)
            previous = previous.view(T, B, 1, D)
            # the previous token's spikes (decoding one token: the carried ones, as they are)
            shifted = previous if n == 1 else torch.cat([previous, spikes[:, :, :-1]], dim=2)
            kv_in = torch.cat([spikes, shifted], dim=-1)
        else:
            shifted, kv_in = None, spikes
        kv = self.kv_proj(kv_in)
        if self.kv_one_population:  # the same neurons: one call fires both (and counts both: the same layer)
            k, v = self.k_neuron(kv).chunk(2, dim=-1)
        else:
            k, v = kv.chunk(2, dim=-1)
            k, v = self.k_neuron(k), self.v_neuron(v)
        if padded:
            k, v = k * mask[None, :, :, None], v * mask[None, :, :, None]

        log_decay = self.log_decays(spikes)  # [B', H, n]
        H, d = self.num_heads, self.head_dim
        if state is not None and state.attention_state is not None:
            carried = (state.attention_state, state.decay_sum)
        elif recurrent:
            carried = (spikes.new_zeros(self.kind.state_shape(T, B, H, d)), spikes.new_zeros(B, H))
        else:
            carried = None  # nothing seen yet: the parallel form skips the zero state's terms
        mask = mask.to(dtype)
        heads = [self._heads(x) for x in (q, k, v)]  # [T, B, H, n, d] each
        if recurrent:
            out, carried = self.kind.recurrent(*[x[..., 0, :] for x in heads], torch.exp(log_decay[..., 0]),
                                               self.scale, mask[:, 0], carried)
            out = out[..., None, :]
        else:
            # blocks of a contiguous [T, B, H, n, d] copy: each block's matmuls read it in place, and split's
            # gradient is one cat (a slice's is a zero tensor of the whole per block)
            blocks = [x.contiguous().split(ATTENTION_BLOCK, dim=-2) for x in heads]
            decays, masks = log_decay.split(ATTENTION_BLOCK, dim=-1), mask.split(ATTENTION_BLOCK, dim=-1)
            outs = []
            for b, (q_b, k_b, v_b) in enumerate(zip(*blocks)):
                # without a cache to fill, the state after the last block is not needed (training, scoring)
                keep_state = state is not None or b + 1 < len(decays)
                out, carried = self.kind.parallel(q_b, k_b, v_b, decays[b], self.scale, masks[b], carried,
                                                  keep_state)
                outs.append(out)
            out = torch.cat(outs, dim=-2)
        out = out.transpose(2, 3).reshape(T, B, n, D)
        if self.kind.q_masks_readout:  # the thresholded running mean, masked by q
            attended = q * self.readout_neuron(self.scale * out if self.scale != 1.0 else out)
        else:
            attended = self.readout_neuron(out)
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
        self.fc_in = SpikeLinear(config.hidden_size, config.intermediate_size)
        self.hidden_neuron = make_neuron(config)
        self.fc_out = SpikeLinear(config.intermediate_size, config.hidden_size)

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

    def forward(self, membrane, mask, state=None, recurrent=False, padded=True):
        membrane = membrane + self.attention(self.attention_neuron(self.attention_norm(membrane)), mask, state,
                                             recurrent, padded)
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
            if getattr(module, "_is_gate", False):
                std = GATE_INIT_STD
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
            init.constant_(module.leak_logit, leak_logit(config.leak_value))
        elif isinstance(module, SpikeLMAttention) and module.decay_logit is not None:
            decay = torch.tensor(module.fixed_decay).clamp(max=MAX_INITIAL_DECAY)
            init.copy_(module.decay_logit, torch.logit(decay))


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
            if layer.attention.gate_proj is not None:
                layer.attention.gate_proj._is_gate = True
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
        padded = not bool(mask.all())  # decoding one sequence: nothing to mask
        compiled = _COMPILED_DECODE.get(self) if recurrent else None
        if compiled is not None and getattr(self.output_neuron, "counter", None) is None:  # energy counts: eager
            spikes = compiled(self, membrane, mask, cache.layers, padded)
        else:
            spikes = self._layers(membrane, mask, cache.layers if cache is not None else None, recurrent, padded)
        if cache is not None:
            if not recurrent and self in _COMPILED_DECODE:  # the layout the compiled step leaves: one compilation
                for layer in cache.layers:
                    layer.decay_sum, layer.previous_spikes = layer.decay_sum.contiguous(), \
                        layer.previous_spikes.contiguous()
            cache.seen_tokens += n
        return spikes

    def _layers(self, membrane, mask, states, recurrent, padded=True):
        for i, block in enumerate(self.layers):
            membrane = block(membrane, mask, states[i] if states is not None else None, recurrent, padded)
        return self.output_neuron(self.norm(membrane))

    def compile_decode(self, enabled: bool = True, **compile_options):
        """Run each one-token decode step (the recurrent form through every layer) as one `torch.compile`d
        function: its shapes are fixed by the batch size (the state has no token axis), so it compiles once per
        batch size and dtype, and the hundreds of small operations of a step (T neuron steps per population,
        the state updates) fuse into a few generated kernels. The matrices then take the dense matmul (the
        event-driven gather-sum has data-dependent shapes). Energy counting runs the eager step. Off by default:
        the first compiled step costs a compilation (about a minute on 2 CPU cores; cached on disk afterwards).
        `compile_options` go to torch.compile (e.g. mode="reduce-overhead" on a GPU)."""
        if enabled:
            _COMPILED_DECODE[self] = torch.compile(_recurrent_layers, dynamic=False, **compile_options)
        else:
            _COMPILED_DECODE.pop(self, None)
        return self


def _recurrent_layers(model, membrane, mask, states, padded):
    """The one-token step that compile_decode compiles (the model is an argument: nothing holds on to it)."""
    return model._layers(membrane, mask, states, True, padded)


class SpikeLMForCausalLM(SpikeLMPreTrainedModel, GenerationMixin):
    """SpikeLM with its LM head: logits are the mean over T of the head applied to the output spikes."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SpikeLMConfig):
        super().__init__(config)
        self.model = SpikeLMModel(config)
        self.lm_head = SpikeLinear(config.hidden_size, config.vocab_size, counts=True)
        self.lm_head.fed_spike_counts = config.neuron_type != "qcfs"  # for the energy count (see forward)
        self.counter = None  # set by spikelm.energy while counting
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def compile_decode(self, enabled: bool = True, **compile_options):
        """Compile the one-token decode step (see SpikeLMModel.compile_decode); `generate()` then uses it."""
        self.model.compile_decode(enabled, **compile_options)
        return self

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
        # [B, N, V]: the mean over the T steps of the head fed each step's spikes. The head is linear, so
        # mean_t W s_t = W (sum_t s_t) / T: one matmul on the per-token spike counts (whole numbers 0..T, kept
        # time-first as [1, B, N, D]) instead of T; each spike still adds one column of W (the same ACs)
        counts = spikes.sum(0, keepdim=True)
        logits = self.lm_head(counts).squeeze(0) / spikes.shape[0]  # squeeze: a view, and so is its gradient
        if self.counter is not None:
            self.counter.head_average(self, logits)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)


# generate() reads forward's signature at every step for a model registered as custom code (`auto_map`); the
# signature is computed here once instead (about 70 microseconds of each decode step otherwise)
SpikeLMForCausalLM.forward.__signature__ = inspect.signature(SpikeLMForCausalLM.forward)

__all__ = ["ATTENTION_KINDS", "AttentionKind", "SpikeLMCache", "SpikeLMForCausalLM", "SpikeLMModel", "SpikeLMPreTrainedModel"]
