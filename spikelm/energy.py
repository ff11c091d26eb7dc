"""Energy accounting: operations counted exactly from the spikes that flowed, and the memory traffic they cause.

Operation rules (docs/design.md, "Energy"; the README's "Energy accounting"), one small pure function each, over
counts:

- a weight matrix out x in fed spikes: out x (number of input spikes) accumulates (ACs);
  fed real values: out x in multiply-accumulates (MACs) per input vector;
- spike attention: what its recurrent form performs. The state update and the read-out add only where
  spikes are 1 (ACs); the decay, the decay sum and the scale are multiplications (MACs); a gated decay adds
  its matrix (fed spikes, as any other) and, per head and token, its sum over the steps, bias and sigmoid;
- neurons: per neuron and step, charging is a MAC (leak * v + x; an AC for IF, whose leak is 1) and the
  threshold comparison an AC; a soft reset subtracts the threshold once per spike (AC);
- the membrane shortcut adds each branch's output to the residual stream: an AC per element and step,
  reported in the `neurons` row (it is a membrane update);
- norms: their multiplications as MACs and additions as ACs, in their own row;
- a division and a reciprocal square root are not one operation: a reciprocal 1/z costs RECIPROCAL_MACS = 4
  MACs (Newton-Raphson x <- x (2 - z x), 2 MACs an iteration, 2 iterations from an 8-bit table seed reach
  fp32's 24 bits) and an rsqrt RSQRT_MACS = 7 (y <- y (1.5 - 0.5 a y^2): 0.5 a once, then 3 MACs an
  iteration, 2 iterations). The same counts at every precision (fewer iterations would do at int8: we do
  not round in spikelm's favour).

Memory rules (after the analytical models of Lemaire et al. 2022, "An analytical estimation of spiking neural
networks energy efficiency", ICONIP, as SpikingJelly's energy estimate uses it, and Yan et al. 2024,
"Reconsidering the energy efficiency of spiking neural networks"), counted in values and priced in bits:

- weights: an event-driven layer reads the column of each firing input, each step (out values per input
  spike); a dense layer reads every weight for each input vector;
- neuron state: each neuron's membrane is read and written once per step;
- attention state: the recurrent form reads and writes its whole state each token and step (ssa: H d^2
  values per step, sdsa: D), the decay sum once per token; the token shift reads and writes the previous
  token's spikes (1 bit each); GPT-2's KV cache: 2 D values written per token and layer, 2 D values read per
  past position;
- the head's running sum of logits over the T steps is read and written at each step after the first.
Activations passed between layers (spikes or real values) and the embedding lookup are left out for every
model alike.

Prices (`Prices`, all settable): an add and a multiply at fp32, bf16 or int8 from Horowitz 2014 ("Computing's
energy problem", ISSCC; 45 nm): fp32 add 0.9 pJ, multiply 3.7 pJ; fp16 add 0.4, multiply 1.1 (used for bf16,
which Horowitz does not list; a bf16 multiplier is smaller, so this does not favour spikelm); int8 add 0.03,
multiply 0.2. E_AC = add, E_MAC = multiply + add (fp32: 0.9 and 4.6 pJ). A memory access: 10 pJ per 64 bits
read from an 8 KiB SRAM (Horowitz 2014), writes priced as reads; DRAM costs 1.3 to 2.6 nJ per 64 bits
(DRAM_PJ_PER_64_BITS = 2000 to price off-chip weights). Weights and states take the precision's bits; spikes
1 bit.

References, each counted by the same rules for exactly the work the same call does (a head only where
logits are computed; real tokens only): the same-shape GPT-2 at fp32 and at int8 (its weights, softmax
attention products, norms and residual adds; softmax, GELU and biases are left out, in its favour), and the
ANN twin of spikelm's own architecture (real-valued activations, one pass, the same linear attention, ReLU
activations counted as one comparison each), priced at the chosen precision.

Hooks and `counter` attributes only collect counts; the arithmetic lives in the rule functions.
"""

import math
import operator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
from torch import nn

from .event_driven import SpikeLinear
from .kernels import row_stats as row_stats_kernel
from .kernels import supports as kernel_supports
from .modeling_spikelm import SpikeLMAttention, SpikeLMBlock, SpikeLMForCausalLM, SpikeLMModel, SpikeLMRMSNorm
from .neurons import SpikingNeuron

# precision: (E_AC = an add, E_MAC = a multiply + an add, in pJ; bits per value). Horowitz 2014, 45 nm:
# fp32 add 0.9, multiply 3.7; fp16 (for bf16) add 0.4, multiply 1.1; int8 add 0.03, multiply 0.2
PRECISIONS = {"fp32": (0.9, 4.6, 32), "bf16": (0.4, 1.5, 16), "int8": (0.03, 0.23, 8)}
E_AC_PJ, E_MAC_PJ = PRECISIONS["fp32"][:2]
SRAM_PJ_PER_64_BITS = 10.0  # 8 KiB SRAM read, Horowitz 2014
DRAM_PJ_PER_64_BITS = 2000.0  # DRAM: 1.3 to 2.6 nJ per 64 bits, Horowitz 2014
RECIPROCAL_MACS = 4
RSQRT_MACS = 7
KINDS = ("weights", "attention", "neurons", "norms")


# ================================================================ rules: counts in, (ACs, MACs) out


def weight_ops_on_spikes(out_features: int, input_spikes: int) -> tuple[int, int]:
    """Each input spike adds one column of the matrix into the output: out ACs per spike."""
    return out_features * input_spikes, 0


def weight_ops_on_reals(out_features: int, in_features: int, input_vectors: int) -> tuple[int, int]:
    return 0, out_features * in_features * input_vectors


def neuron_ops(neurons: int, time_steps: int, spikes: int, leak_is_one: bool, reset: str) -> tuple[int, int]:
    """neurons: how many neurons ran (for T steps each). Charge: 1 MAC (1 AC for IF); fire: 1 AC; soft reset:
    1 AC per spike; a hard reset sets the membrane to zero, no arithmetic."""
    steps = neurons * time_steps
    ac = steps + (spikes if reset == "soft" else 0)
    mac = 0
    if leak_is_one:
        ac += steps
    else:
        mac += steps
    return ac, mac


def residual_ops(width: int, vectors: int) -> tuple[int, int]:
    """Adding a branch's output to the residual stream: one AC per element."""
    return width * vectors, 0


def norm_ops(norm_type: str, width: int, vectors: int) -> tuple[int, int]:
    """Per vector of `width`:
    layernorm: sum (D ACs), centre (D ACs), + eps (1 AC); squares (D MACs), mean and variance scaling (2 MACs),
        rsqrt (RSQRT_MACS), normalise (D MACs), affine (D MACs)  ->  2D + 1 ACs, 3D + 2 + RSQRT_MACS MACs
    rmsnorm: squares (D MACs), scaling (1 MAC), + eps (1 AC), rsqrt (RSQRT_MACS), normalise (D MACs),
        gain (D MACs)  ->  1 AC, 3D + 1 + RSQRT_MACS MACs
    """
    if norm_type == "layernorm":
        return (2 * width + 1) * vectors, (3 * width + 2 + RSQRT_MACS) * vectors
    if norm_type == "rmsnorm":
        return vectors, (3 * width + 1 + RSQRT_MACS) * vectors
    raise ValueError(f"no counting rule for norm {norm_type!r}")


def ssa_ops(time_steps: int, heads: int, head_dim: int, tokens: int, kv_pairs: int, q_spikes: int):
    """Recurrent spike self-attention, summed over tokens, steps and heads:
    S = gamma S + k v^T: d*d MACs (decay) per head and step; one AC per (k, v) spike pair.
    z = gamma z + 1: 1 MAC per head and token (shared by the T steps).
    a = q S: one d-wide row added per q spike: d ACs per q spike.
    a * scale / z: per head and token 1 / z (RECIPROCAL_MACS) and its product with scale (1 MAC), then d MACs
    per head and step.
    """
    ac = kv_pairs + q_spikes * head_dim
    mac = tokens * (time_steps * heads * head_dim * head_dim + heads * (2 + RECIPROCAL_MACS)
                    + time_steps * heads * head_dim)
    return ac, mac


def sdsa_ops(time_steps: int, heads: int, width: int, tokens: int, coincidences: int):
    """Recurrent channel-wise attention, summed over tokens and steps:
    S = gamma S + k*v: D MACs (decay) per step, one AC per coinciding k, v spike.
    z = gamma z + 1: 1 MAC per head and token; r = S / z: 1 / z per head and token (RECIPROCAL_MACS), then
    D MACs per step. q masks the thresholded r: counted as D ACs per step (an AND is cheaper; we do not round
    in our favour).
    """
    ac = coincidences + tokens * time_steps * width
    mac = tokens * (time_steps * width + heads * (1 + RECIPROCAL_MACS) + time_steps * width)
    return ac, mac


def gate_ops(time_steps: int, heads: int, tokens: int) -> tuple[int, int]:
    """A gated decay g = sigmoid(W_g s + b), per head and token, beyond W_g's own ACs (a weight matrix fed
    spikes): summing its T steps (T - 1 ACs), the 1/T of the mean (1 MAC), the bias (1 AC), the sigmoid
    1 / (1 + exp(-x)) (exp: 1 MAC, + 1: 1 AC, the reciprocal: RECIPROCAL_MACS). Multiplying the state and the
    decay sum by g costs what a fixed decay does (ssa_ops, sdsa_ops)."""
    per = tokens * heads
    return per * (time_steps - 1 + 1 + 1), per * (1 + 1 + RECIPROCAL_MACS)


def head_average_ops(vocab_size: int, tokens: int) -> tuple[int, int]:
    """Logits are the mean over T: the head's outputs accumulate over the steps (counted as its ACs), then one
    multiplication by 1/T per logit."""
    return 0, vocab_size * tokens


# ================================================================ rules: memory traffic, in values


def weight_reads_on_spikes(out_features: int, input_spikes: int) -> int:
    """Event-driven: each input spike fetches its column of the matrix (out values), at each step."""
    return out_features * input_spikes


def weight_reads_dense(out_features: int, in_features: int, input_vectors: int) -> int:
    """A dense layer fetches every weight for each input vector."""
    return out_features * in_features * input_vectors


def neuron_state_traffic(neuron_steps: int) -> tuple[int, int]:
    """(reads, writes): each neuron's membrane is read and written back once per step."""
    return neuron_steps, neuron_steps


def attention_state_traffic(state_values: int, heads: int, tokens: int) -> tuple[int, int]:
    """(reads, writes) of the recurrent form per row: its whole state each token (the decay touches all of it;
    ssa: T H d^2 values, sdsa: T D) and the H decay sums."""
    values = tokens * (state_values + heads)
    return values, values


def token_shift_traffic(time_steps: int, width: int, tokens: int) -> tuple[int, int]:
    """(reads, writes) of 1-bit values: the previous token's spikes, read for K and V, replaced by this one's."""
    values = tokens * time_steps * width
    return values, values


def head_average_traffic(time_steps: int, vocab_size: int, logits: int) -> tuple[int, int]:
    """(reads, writes): the running sum of a position's logits, read and written at every step after the first."""
    values = (time_steps - 1) * vocab_size * logits
    return values, values


def kv_cache_traffic(width: int, layers: int, tokens: int, context: int) -> tuple[int, int]:
    """(reads, writes) of a softmax-attention KV cache: per layer each token writes its key and value (2 D) and
    reads the keys and values of every position up to its own (2 D per position: `context` positions in all)."""
    return 2 * width * layers * context, 2 * width * layers * tokens


# ================================================================ prices


@dataclass(frozen=True)
class Prices:
    """pJ per operation and per memory access at one precision (Horowitz 2014 defaults, all settable)."""

    precision: str = "fp32"
    e_ac: float | None = None  # default: the precision's add
    e_mac: float | None = None  # default: the precision's multiply + add
    bits: int | None = None  # bits per weight and state value; default: the precision's
    read_pj_per_64_bits: float = SRAM_PJ_PER_64_BITS
    write_pj_per_64_bits: float = SRAM_PJ_PER_64_BITS

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)} (got {self.precision!r})")
        e_ac, e_mac, bits = PRECISIONS[self.precision]
        for name, default in (("e_ac", e_ac), ("e_mac", e_mac), ("bits", bits)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        if min(self.e_ac, self.e_mac, self.read_pj_per_64_bits, self.write_pj_per_64_bits) < 0 or self.bits < 1:
            raise ValueError(f"energy prices must be non-negative and bits at least 1 (got {self})")

    def compute_pj(self, counts) -> float:
        return picojoules(counts.ac, counts.mac, self.e_ac, self.e_mac)

    def memory_pj(self, counts) -> float:
        read, write = self.read_pj_per_64_bits / 64, self.write_pj_per_64_bits / 64  # per bit
        return ((counts.weight_reads + counts.state_reads) * self.bits * read + counts.state_writes * self.bits * write
                + counts.spike_reads * read + counts.spike_writes * write)


def picojoules(ac, mac, e_ac=E_AC_PJ, e_mac=E_MAC_PJ):
    return e_ac * ac + e_mac * mac


# ================================================================ counts


@dataclass
class EnergyCounts:
    """Exact counts of the work done for one sequence (one batch row), or summed over several.

    Memory traffic in values: weights and states at the precision's bits, spikes at 1 bit.
    tokens: real positions processed; logits: real positions whose logits were computed; context: the sum over
    real positions of their 1-based position in their sequence (what softmax attention's cost grows with).
    """

    ac: int = 0
    mac: int = 0
    weight_reads: int = 0
    state_reads: int = 0
    state_writes: int = 0
    spike_reads: int = 0
    spike_writes: int = 0
    spikes: int = 0
    neuron_steps: int = 0
    tokens: int = 0
    logits: int = 0
    context: int = 0

    def __iadd__(self, other):
        mine, theirs = self.__dict__, other.__dict__
        for name in self.__dataclass_fields__:
            mine[name] += theirs[name]
        return self

    def picojoules(self, e_ac=E_AC_PJ, e_mac=E_MAC_PJ) -> float:
        """Operation energy (see `figures` for memory and totals at a precision)."""
        return picojoules(self.ac, self.mac, e_ac, e_mac)

    @property
    def firing_rate(self) -> float:
        return self.spikes / self.neuron_steps if self.neuron_steps else 0.0

    def figures(self, prices: Prices, per: int) -> dict:
        """Counts and energy per `per` (tokens): ACs, MACs, memory traffic, compute / memory / total pJ."""
        compute, memory = prices.compute_pj(self), prices.memory_pj(self)
        out = {name: getattr(self, name) / per for name in ("ac", "mac", "weight_reads", "state_reads",
                                                             "state_writes", "spike_reads", "spike_writes")}
        out.update(compute_pj=compute / per, memory_pj=memory / per, total_pj=(compute + memory) / per,
                   precision=prices.precision)
        return out


# ================================================================ references: the same rules, from a config


def gpt2_reference_counts(config, tokens, logits=None, context=None):
    """A same-shape GPT-2 (the width, depth, vocabulary and MLP of `config`) doing the work of `tokens` real
    tokens with causal softmax attention and a KV cache.

    logits: positions whose logits it computes (default: every token; generate() keeps the last one of a
    prompt); context: the sum of the tokens' 1-based positions (default: one sequence, tokens (tokens + 1) / 2).
    Per token and layer: Q, K, V and output projections 4 D^2, MLP 2 D * inner. Attention at position p
    (1-based): q.k over p keys (D MACs each) and the weighted sum of p values (D MACs each).
    The LM head: V * D per logit. Norms (2 per layer and a final one): norm_ops; residual adds: 2 D per layer.
    Softmax, GELU and biases are left out (in GPT-2's favour).
    Returns MACs by part ("weights", "attention", "head", "norms", "total") and the whole as EnergyCounts ("counts").
    """
    D, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size  # a GPT2Config maps these too
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * D
    logits = tokens if logits is None else logits
    context = tokens * (tokens + 1) // 2 if context is None else context
    weights = tokens * L * (4 * D * D + 2 * D * inner)
    attention = L * 2 * D * context
    head = logits * V * D
    norm_ac, norm_mac = norm_ops("layernorm", D, tokens * (2 * L + 1))
    residual_ac, _ = residual_ops(D, tokens * 2 * L)
    kv_reads, kv_writes = kv_cache_traffic(D, L, tokens, context)
    counts = EnergyCounts(ac=norm_ac + residual_ac, mac=weights + attention + head + norm_mac,
                          weight_reads=weights + head, state_reads=kv_reads, state_writes=kv_writes,
                          tokens=tokens, logits=logits, context=context)
    return {"weights": weights, "attention": attention, "head": head, "norms": norm_mac,
            "total": weights + attention + head + norm_mac, "counts": counts}


def ann_twin_reference_counts(config, tokens, logits=None) -> EnergyCounts:
    """The ANN twin of a spikelm `config`: the same layers with real-valued activations (ReLU where spikelm has
    neurons), one pass per token, the same linear attention in its recurrent form. Every matrix is fed real
    values (MACs, dense weight reads). Per token and layer:
      attention (ssa): S = gamma S + k v^T: 2 MACs per element of the H d x d state (decay, product);
        z = gamma z + 1: 1 MAC per head; q S: H d^2 MACs; scale / z: RECIPROCAL_MACS + 1 per head, d per head;
      attention (sdsa): S = gamma S + k * v: 2 D MACs; z: 1 MAC per head; 1 / z: RECIPROCAL_MACS per head;
        S / z: D MACs; q times the activated read-out: D MACs;
      state traffic: the attention state and the decay sums read and written, the token shift's previous
        activations (D values) read and written;
      activations: one comparison (AC) each; norms: norm_ops; residual adds: 2 D ACs.
    """
    D, L, V, H, d = (config.hidden_size, config.num_hidden_layers, config.vocab_size, config.num_attention_heads,
                     config.head_dim)
    inner = config.intermediate_size
    logits = tokens if logits is None else logits
    kv_in = 2 * D if config.token_shift else D
    weights = L * (D * D + kv_in * 2 * D + D * D + 2 * D * inner)
    if config.attention_type == "ssa":
        attention_mac = 3 * H * d * d + H * (2 + RECIPROCAL_MACS) + H * d
        state = H * d * d + H
    else:
        attention_mac = 2 * D + H * (1 + RECIPROCAL_MACS) + D + D
        state = D + H
    if getattr(config, "gated_decay", False):  # the gate's matrix (H x D, fed real values) and its sigmoid
        weights += L * H * D
        attention_mac += gate_ops(1, H, 1)[1]
    activations = L * (D + 4 * D + D + inner) + D  # attention input, q, k, v, read-out; MLP input, hidden; output
    norm_ac, norm_mac = norm_ops(config.norm_type, D, 2 * L + 1)
    if getattr(config, "gated_decay", False):
        norm_ac += L * gate_ops(1, H, 1)[0]
    shift = D if config.token_shift else 0
    return EnergyCounts(
        ac=tokens * (activations + norm_ac + 2 * L * D),
        mac=tokens * (weights + L * attention_mac + norm_mac) + logits * V * D,
        weight_reads=tokens * weights + logits * V * D,
        state_reads=tokens * L * (state + shift), state_writes=tokens * L * (state + shift),
        tokens=tokens, logits=logits, context=tokens * (tokens + 1) // 2)


REFERENCES = {  # name: (what it is, its precision: None = the report's)
    "gpt2_fp32": ("same-shape GPT-2, fp32", "fp32"),
    "gpt2_int8": ("same-shape GPT-2, int8", "int8"),
    "ann_twin": ("ANN twin (real activations, same linear attention)", None),
}


def reference_counts(name, config, counts: EnergyCounts) -> EnergyCounts:
    """The reference `name` doing the work spikelm's `counts` record (same real tokens, same logits)."""
    if name.startswith("gpt2"):
        return gpt2_reference_counts(config, counts.tokens, logits=counts.logits, context=counts.context)["counts"]
    if name == "ann_twin":
        return ann_twin_reference_counts(config, counts.tokens, logits=counts.logits)
    raise ValueError(f"no reference {name!r}; known: {sorted(REFERENCES)}")


def summarise(counts: EnergyCounts, config, prices: Prices | None = None, per: int | None = None) -> dict:
    """Per-token figures of spikelm's `counts` and of every reference doing the same work, at `prices`.

    per: the denominator (default: the real tokens processed; the server divides by generated tokens).
    Ratios are spikelm over the reference: below 1, spikelm spends less.
    """
    prices = prices or Prices()
    per = per or counts.tokens
    spikelm = counts.figures(prices, per)
    spikelm["by_precision"] = {p: counts.figures(Prices(p, read_pj_per_64_bits=prices.read_pj_per_64_bits,
                                                          write_pj_per_64_bits=prices.write_pj_per_64_bits), per)
                               for p in PRECISIONS}
    references = {}
    for name, (label, precision) in REFERENCES.items():
        # at the report's own precision a reference takes the report's prices (settings included)
        reference_prices = prices if precision in (None, prices.precision) else Prices(
            precision, read_pj_per_64_bits=prices.read_pj_per_64_bits, write_pj_per_64_bits=prices.write_pj_per_64_bits)
        figures = reference_counts(name, config, counts).figures(reference_prices, per)
        figures["label"] = label
        for part in ("compute", "total"):
            figures[f"{part}_ratio"] = spikelm[f"{part}_pj"] / figures[f"{part}_pj"] if figures[f"{part}_pj"] else 0.0
        references[name] = figures
    return {"spikelm": spikelm, "references": references,
            "prices": {f.name: getattr(prices, f.name) for f in fields(prices)}}


# ================================================================ collecting


def _row_stats(x):
    """x [T, B, ...] -> (non-zeros of each batch row, sum of each batch row, every value 0 or 1, every value a
    whole number >= 0): one C pass over x where the kernels are at hand (spikelm.kernels.row_stats)."""
    if kernel_supports(x):
        return row_stats_kernel(x)
    flat = x.movedim(1, 0).reshape(x.shape[1], -1)
    whole = bool((flat >= 0).all()) and bool((flat == flat.round()).all())
    return (torch.count_nonzero(flat, dim=1).tolist(), flat.sum(1, dtype=torch.float64).tolist(),
            not bool(((flat != 0) & (flat != 1)).any()), whole)


COUNTED = tuple(f.name for f in fields(EnergyCounts))
MEMO_LIMIT = 4096


class EnergyCounter:
    """Collects exact counts per batch row: operations and memory traffic per (layer, kind), spikes and
    neuron-steps per layer, real tokens, computed logits and positions. Every figure of the report is a sum
    over rows; `row(i)` gives one sequence's counts (the serving engine batches many sequences in one forward).

    positions: tokens each row has already processed before the counter starts (a decode step continues
    sequences whose earlier forwards another counter saw); a forward with no state to continue starts its
    rows' sequences afresh.
    """

    def __init__(self, positions=None):
        self._lists = {}  # (quantity, layer, kind) -> [int per row]; layer and kind are None where not per layer
        self._uniform = {}  # ((quantity, layer, kind), rows) -> int added to each of the first `rows` rows
        # Counts that depend only on a module and its input's shape (a norm's, a neuron's steps and state
        # traffic, ...) are worked out once per (module, shape) and kept in `memo` (a CounterSwitch shares one
        # between the counters it passes counts to); a forward only notes which apply (`_pending`), and they are
        # summed when counts are read, once per distinct list (a decode step makes the same list every token).
        self._pending = []
        self.memo = {}
        self._known = {}  # id(spikes) -> (spikes, row stats): a population's spikes, counted as it fired
        self.labels = {}  # module -> layer label
        self.config = None
        self._position = [int(p) for p in positions] if positions is not None else []  # per row
        self._mask = None  # [B, n] real positions of the last forward (None: every position is real)

    def reset(self):
        self._lists.clear()
        self._uniform.clear()
        self._pending.clear()
        self._known.clear()
        self._position = []

    def _constant(self, token, compute):
        """Note the counts of `token` (hashable: a handler, a module, a shape), which depend on nothing else:
        `compute()` -> [((quantity, layer, kind), rows, value)], worked out the first time only."""
        entries = self.memo.get(token)
        if entries is None:
            entries = tuple(entry for entry in compute() if entry[2])
            self._remember(token, entries)
        self._pending.append(entries)

    def _flush(self):
        """Add the noted constant counts into `_uniform`: summed once per distinct list of notes."""
        if not self._pending:
            return
        signature = tuple(map(id, self._pending))
        summed = self.memo.get(signature)
        if summed is None or summed[0] != self._pending:  # (an id reused by another tuple: work it out again)
            totals = {}
            for entries in self._pending:
                for key, rows, value in entries:
                    totals[(key, rows)] = totals.get((key, rows), 0) + value
            summed = (list(self._pending), tuple(totals.items()))
            self._remember(signature, summed)
        for key, value in summed[1]:
            self._uniform[key] = self._uniform.get(key, 0) + value
        self._pending.clear()

    def _stats(self, x):
        """_row_stats(x), from the population that fired x where it counted them already."""
        known = self._known.get(id(x))
        if known is not None and known[0] is x:
            return known[1]
        return _row_stats(x)

    def _add(self, key, per_row, rows):
        """Add per-row counts under `key`: an int (the same for each row), a list of `rows` ints, or an int64
        tensor [rows]. Kept as Python integers (exact, and a decode step adds a few hundred small counts, each
        tensor operation a few microseconds); a count the same for every row is summed once, not per row."""
        if isinstance(per_row, torch.Tensor):
            per_row = per_row.to(torch.int64).expand(rows).tolist() if per_row.dim() else int(per_row)
        if isinstance(per_row, list) and rows == 1:  # one sequence (a lone decode): a plain number
            per_row = per_row[0]
        if isinstance(per_row, int):
            if per_row:  # nothing to add for most traffic kinds of most hooks
                self._uniform[(key, rows)] = self._uniform.get((key, rows), 0) + per_row
            return
        total = self._lists.get(key)
        if total is None:
            self._lists[key] = list(per_row)
            return
        if len(total) < rows:  # a wider batch than before: more rows
            total += [0] * (rows - len(total))
        total[:len(per_row)] = map(operator.add, total, per_row)  # (a loop in C)

    def _merged(self) -> dict:
        """{(quantity, layer, kind): [count per row]}, as Python integers."""
        self._flush()
        for (key, rows), value in self._uniform.items():
            total = self._lists.setdefault(key, [])
            if len(total) < rows:
                total += [0] * (rows - len(total))
            for i in range(rows):
                total[i] += value
        self._uniform.clear()
        return self._lists

    @property
    def counts(self):
        """{(quantity, layer, kind): int64 tensor [rows]}, everything added so far."""
        return {key: torch.tensor(values, dtype=torch.int64) for key, values in self._merged().items()}

    def add(self, layer, kind, ops, rows=1):
        """ops: (ACs, MACs), each an int, a tensor [rows], or for per-row rules a list of (AC, MAC) per row."""
        if isinstance(ops, list) and len(ops) == 1:  # one row
            ac, mac = ops[0]
        elif isinstance(ops, list):  # one (AC, MAC) per row; a part the same in every row is added once
            ac, mac = [row[0] for row in ops], [row[1] for row in ops]
            ac, mac = (part[0] if len(set(part)) == 1 else part for part in (ac, mac))
        else:
            ac, mac = ops
        for quantity, values in (("ac", ac), ("mac", mac)):
            if not (isinstance(values, int) and values == 0):  # a decode step makes hundreds of these calls
                self._add((quantity, layer, kind), values, rows)

    def add_traffic(self, layer, kind, rows, weight_reads=0, state=(0, 0), spike=(0, 0)):
        for quantity, values in (("weight_reads", weight_reads), ("state_reads", state[0]),
                                 ("state_writes", state[1]), ("spike_reads", spike[0]), ("spike_writes", spike[1])):
            if not (isinstance(values, int) and values == 0):
                self._add((quantity, layer, kind), values, rows)

    # --- called by hooks and by the modules' `counter` attribute; tensors are [T, B, n, ...] (batch in dim 1)
    def linear(self, module, inputs, output):
        x = inputs[0]
        rows, layer, out = x.shape[1], self.labels[module], module.out_features
        nonzero, sums, binary, whole = self._stats(x)
        if binary and rows == 1 and module.bias is None:  # a lone decode step: plain numbers
            spikes = nonzero[0]
            if spikes:  # both rules are linear in the spikes: one spike's counts, times the spikes
                uniform = self._uniform
                plan = self.memo.get(("linear", module))
                if plan is None:
                    plan = ((("ac", layer, "weights"), 1), weight_ops_on_spikes(out, 1)[0],
                            (("weight_reads", layer, "weights"), 1), weight_reads_on_spikes(out, 1))
                    assert weight_ops_on_spikes(out, 1)[1] == 0  # (no MACs to add)
                    self._remember(("linear", module), plan)
                ac_key, ac, reads_key, reads = plan
                uniform[ac_key] = uniform.get(ac_key, 0) + ac * spikes
                uniform[reads_key] = uniform.get(reads_key, 0) + reads * spikes
            return
        if binary:  # both rules are linear in the spikes: one spike's counts, times each row's spikes
            ac, mac = weight_ops_on_spikes(out, 1)
            read = weight_reads_on_spikes(out, 1)
            ops = ([ac * spikes for spikes in nonzero], [mac * spikes for spikes in nonzero] if mac else 0)
            reads = [read * spikes for spikes in nonzero]
        elif getattr(module, "fed_spike_counts", False) and whole:
            # the LM head gets per-token counts of its input spikes: each counted spike adds one column, as a
            # spike does, and a column is read per non-zero count
            ops = [weight_ops_on_spikes(out, int(spikes)) for spikes in sums]
            reads = [weight_reads_on_spikes(out, columns) for columns in nonzero]
        else:
            vectors = x.shape[0] * math.prod(x.shape[2:]) // module.in_features  # one row's
            ops = weight_ops_on_reals(out, module.in_features, vectors)
            reads = weight_reads_dense(out, module.in_features, vectors)
        self.add(layer, "weights", ops, rows)
        self.add_traffic(layer, "weights", rows, weight_reads=reads)
        if module.bias is not None:  # one addition per output (none of spikelm's matrices have a bias)
            outputs = output.shape[0] * math.prod(output.shape[2:])  # one row's
            self.add(layer, "weights", (outputs, 0), rows)
            self.add_traffic(layer, "weights", rows, weight_reads=outputs)

    def norm(self, module, inputs, output):
        x = inputs[0]
        self._constant(("norm", module, x.shape), lambda: self._norm_counts(module, x.shape))

    def _norm_counts(self, module, shape):
        kind = "layernorm" if isinstance(module, nn.LayerNorm) else "rmsnorm"
        width, rows = shape[-1], shape[1]
        ac, mac = norm_ops(kind, width, shape[0] * math.prod(shape[2:]) // width)  # one row's vectors
        layer = self.labels[module]
        return [(("ac", layer, "norms"), rows, ac), (("mac", layer, "norms"), rows, mac)]

    def block(self, module, inputs, output):
        shape = inputs[0].shape  # the membrane [T, B, n, D]; two branches add into it
        self._constant(("block", module, shape), lambda: self._block_counts(module, shape))

    def _block_counts(self, module, shape):
        return [(("ac", self.labels[module], "neurons"), shape[1],
                 residual_ops(shape[-1], 2 * shape[0] * math.prod(shape[2:-1]))[0])]  # one row's T * n vectors, twice

    def _stack_counts(self, model, shape):
        """The norms' and the residual additions' counts of a SpikeLMModel's whole stack, for membranes of
        `shape` [T, B, n, D] (every norm and block sees that shape; their counts are linear in the tokens, so a
        prefill run chunk by chunk counts the same)."""
        entries = []
        for block in model.layers:
            entries += self._norm_counts(block.attention_norm, shape) + self._norm_counts(block.mlp_norm, shape)
            entries += self._block_counts(block, shape)
        return entries + self._norm_counts(model.norm, shape)

    def fired(self, neuron, spikes, row_spikes=None):  # a SpikingNeuron fired (row_spikes: counted as it fired)
        shape = spikes.shape
        plan = self.memo.get(("neuron", neuron, shape))
        if plan is None:
            plan = self._neuron_plan(neuron, shape)
        constant, per_spike, ac_key, spikes_key = plan
        self._pending.append(constant)
        if row_spikes is None:
            row_spikes = _row_stats(spikes)[0]
        self._known[id(spikes)] = (spikes, (row_spikes, row_spikes, True, True))  # for the matrix it feeds
        if shape[1] == 1:  # a lone decode step: plain numbers
            fired = row_spikes[0]
            if fired:
                uniform = self._uniform
                if per_spike:
                    uniform[ac_key] = uniform.get(ac_key, 0) + per_spike * fired
                uniform[spikes_key] = uniform.get(spikes_key, 0) + fired
            return
        layer, rows = self.labels[neuron], shape[1]
        if per_spike:
            self._add(("ac", layer, "neurons"), [per_spike * fired for fired in row_spikes], rows)
        self._add(("spikes", layer, None), row_spikes, rows)

    def _neuron_plan(self, neuron, shape):
        """A population's counts for input `shape` [T, B, ...]: those for no spike (the same every forward of
        this shape: neuron_ops is affine in the spikes), the ACs each spike adds (a soft reset's subtraction),
        and the keys its per-spike counts go to in a one-row forward."""
        layer, rows, T = self.labels[neuron], shape[1], shape[0]
        neurons = math.prod(shape[2:])  # per row and step
        steps = T * neurons
        leak_is_one = neuron.leak_logit is None and neuron.fixed_leak == 1.0
        ac, mac = neuron_ops(neurons, T, 0, leak_is_one, neuron.reset)
        reads, writes = neuron_state_traffic(steps)
        constant = tuple(entry for entry in [
            (("ac", layer, "neurons"), rows, ac), (("mac", layer, "neurons"), rows, mac),
            (("state_reads", layer, "neurons"), rows, reads), (("state_writes", layer, "neurons"), rows, writes),
            (("neuron_steps", layer, None), rows, steps)] if entry[2])
        per_spike = neuron_ops(neurons, T, 1, leak_is_one, neuron.reset)[0] - ac
        plan = (constant, per_spike, (("ac", layer, "neurons"), 1), (("spikes", layer, None), 1))
        self._remember(("neuron", neuron, shape), plan)
        return plan

    def _remember(self, token, value):
        if len(self.memo) > MEMO_LIMIT:  # a server sees many prompt lengths: keep the memo bounded
            self.memo.clear()
        self.memo[token] = value

    def attention(self, module, q, k, v, mask, attended):
        # per batch row, by its kind's rule (ssa_ops or sdsa_ops) and, with a gated decay, gate_ops
        T, B, n, D = q.shape
        ac, mac = module.count_ops(q, k, v)
        self._add(("ac", self.labels[module], "attention"), ac, B)

        def constant():
            layer = self.labels[module]
            state = math.prod(module.kind.state_shape(T, 1, module.num_heads, module.head_dim))  # one row's
            reads, writes = attention_state_traffic(state, module.num_heads, n)
            spike_reads, spike_writes = token_shift_traffic(T, D, n) if module.token_shift else (0, 0)
            return [(("mac", layer, "attention"), B, mac), (("state_reads", layer, "attention"), B, reads),
                    (("state_writes", layer, "attention"), B, writes),
                    (("spike_reads", layer, "attention"), B, spike_reads),
                    (("spike_writes", layer, "attention"), B, spike_writes)]

        self._constant(("attention", module, q.shape), constant)

    def head_average(self, module, logits):  # logits [B, n, V]
        rows, kept, vocab = logits.shape

        def constant():
            ops = head_average_ops(vocab, kept)
            # a head fed each token's spike counts sums nothing over the steps; one fed each step keeps a running
            # sum
            steps = 1 if getattr(module.lm_head, "fed_spike_counts", False) else module.config.time_steps
            reads, writes = head_average_traffic(steps, vocab, kept)
            return [(("ac", "head", "weights"), rows, ops[0]), (("mac", "head", "weights"), rows, ops[1]),
                    (("state_reads", "head", "weights"), rows, reads),
                    (("state_writes", "head", "weights"), rows, writes)]

        self._constant(("head_average", module, logits.shape), constant)
        self._add(("logits", None, None), [kept] * rows if self._mask is None else self._mask[:, -kept:].sum(1),
                  rows)

    def model(self, module, args, kwargs, output):
        # tokens are the real positions: padded ones are computed, and their cost is charged to the real ones
        self._known.clear()  # the stack is done: no matrix will be fed these spikes
        spikes = output.spikes
        rows, n = spikes.shape[1], spikes.shape[2]
        # the stack's norms and residual additions (count_energy hooks none of them: one note instead of 3 per
        # layer, each a hooked module call)
        self._constant(("stack", module, spikes.shape), lambda: self._stack_counts(module, spikes.shape))
        mask = kwargs.get("attention_mask")
        self._mask = None if mask is None else (mask[:, -n:] != 0).long().cpu()
        real = [n] * rows if mask is None else self._mask.sum(1).tolist()
        if output.cache is None or output.cache.seen_tokens == n:  # a forward that starts its sequences
            self._position = [0] * rows
        elif len(self._position) < rows:
            self._position += [0] * (rows - len(self._position))
        start = self._position
        # sum of 1-based positions of this forward's real tokens: start+1 .. start+real
        self._add(("context", None, None), [r * s + r * (r + 1) // 2 for r, s in zip(real, start)], rows)
        self._add(("tokens", None, None), real, rows)
        for i in range(rows):
            start[i] += real[i]

    # --- sums over rows
    def _sum(self, quantity):
        """{(layer, kind) or layer: count summed over rows} for a per-layer quantity."""
        return {(key[1] if key[2] is None else key[1:]): sum(value)
                for key, value in self._merged().items() if key[0] == quantity}

    @property
    def ac(self):
        return self._sum("ac")

    @property
    def mac(self):
        return self._sum("mac")

    @property
    def spikes(self):
        return self._sum("spikes")

    @property
    def neuron_steps(self):
        return self._sum("neuron_steps")

    @property
    def tokens(self) -> int:
        return sum(self._merged().get(("tokens", None, None), []))

    @property
    def rows(self) -> int:
        return max((len(v) for v in self._merged().values()), default=0)

    def _rows(self, one_row_path=True) -> list[tuple[EnergyCounts, dict[str, float]]]:
        """(counts, firing rate per layer) of every batch row, in one pass over the keys."""
        if one_row_path and not self._lists and self._pending:
            rows = self._one_row()
            if rows is not None:
                return rows
        self._flush()
        rows = max([len(values) for values in self._lists.values()] + [n for _, n in self._uniform], default=0)
        # one column of per-row sums per quantity, and per layer for spikes and neuron steps; a count the same in
        # the first n rows and a per-row list are each added in one pass (map: a loop in C, not one per row)
        columns = {}

        def add(quantity, layer, values, n):
            for key in ((quantity, None), (quantity, layer)) if quantity in ("spikes", "neuron_steps") else \
                    ((quantity, None),):
                column = columns.get(key)
                if column is None:
                    column = columns[key] = [0] * rows
                column[:n] = map(operator.add, column[:n], values)

        for ((quantity, layer, _), n), value in self._uniform.items():  # a count the same in the first n rows
            add(quantity, layer, [value] * n, n)
        for (quantity, layer, _), values in self._lists.items():
            add(quantity, layer, values, len(values))
        zeros = [0] * rows
        counts = zip(*(columns.get((quantity, None), zeros) for quantity in COUNTED))
        layers = sorted((key[1] for key in columns if key[0] == "neuron_steps" and key[1] is not None),
                        key=_layer_order)
        spikes = [columns.get(("spikes", layer), zeros) for layer in layers]
        steps = [columns[("neuron_steps", layer)] for layer in layers]
        return [(EnergyCounts(*row_counts),
                 {layer: fired[i] / ran[i] for layer, fired, ran in zip(layers, spikes, steps) if ran[i]})
                for i, row_counts in enumerate(counts)]

    def _one_row(self):
        """_rows() of a counter that saw one row, all of whose counts are plain numbers (a lone decode step), or
        None: the noted constant counts' totals are worked out once per list of notes (as `_flush` sums them),
        and only the counts that vary are added to them. Nothing is moved: the counter reads the same after."""
        signature = ("one row", *map(id, self._pending))
        known = self.memo.get(signature)
        if known is None or known[0] != self._pending:
            if any(rows != 1 for entries in self._pending for _, rows, _ in entries):
                return None
            totals, spikes, steps = dict.fromkeys(COUNTED, 0), {}, {}
            for entries in self._pending:
                for (quantity, layer, _), _, value in entries:
                    _add_to_row(totals, spikes, steps, quantity, layer, value)
            known = (list(self._pending), totals, spikes, steps)
            self._remember(signature, known)
        totals, spikes, steps = dict(known[1]), dict(known[2]), dict(known[3])
        for ((quantity, layer, _), rows), value in self._uniform.items():
            if rows != 1:
                return None
            _add_to_row(totals, spikes, steps, quantity, layer, value)
        return [(EnergyCounts(**totals), {layer: spikes.get(layer, 0) / steps[layer]
                                          for layer in sorted(steps, key=_layer_order) if steps[layer]})]

    def row(self, i) -> EnergyCounts:
        """The counts of batch row i, summed over layers."""
        return self._rows()[i][0]

    def row_firing_rate_per_layer(self, i) -> dict[str, float]:
        """Spikes per neuron and time step of batch row i, by layer ("layers.0", ..., "head"), in layer order."""
        return self._rows()[i][1]

    def per_row(self) -> list[tuple[EnergyCounts, dict[str, float]]]:
        """(row(i), row_firing_rate_per_layer(i)) for every row: what a batched decode step reports."""
        return self._rows()

    def total(self) -> EnergyCounts:
        totals = dict.fromkeys(COUNTED, 0)
        for (quantity, _, _), values in self._merged().items():
            totals[quantity] += sum(values)
        return EnergyCounts(**totals)

    # --- results
    def report(self, e_ac=None, e_mac=None, precision="fp32", prices: Prices | None = None):
        """Per-token figures of spikelm and, when the model's config is known, of the references doing the same
        work. Operation prices: e_ac / e_mac, else `prices`, else the precision's (fp32: 0.9 / 4.6 pJ)."""
        if self.tokens == 0:
            raise ValueError("the energy counter saw no tokens: run the model inside count_energy(model)")
        prices = prices or Prices(precision)
        if e_ac is not None or e_mac is not None:
            prices = Prices(prices.precision, e_ac if e_ac is not None else prices.e_ac,
                            e_mac if e_mac is not None else prices.e_mac, prices.bits, prices.read_pj_per_64_bits,
                            prices.write_pj_per_64_bits)
        tokens = self.tokens
        spikes, steps = self.spikes, self.neuron_steps
        per_kind = {}
        for (quantity, layer, kind), values in self._merged().items():
            if kind is not None:
                per_kind.setdefault((layer, kind), dict.fromkeys(COUNTED, 0))[quantity] += sum(values)
        rows = []
        for layer, kind in sorted(per_kind, key=_row_order):
            counts = EnergyCounts(**per_kind[(layer, kind)])
            figures = counts.figures(prices, tokens)
            rows.append({"layer": layer, "kind": kind, "ac": figures["ac"], "mac": figures["mac"],
                         "pj": figures["compute_pj"], "memory_pj": figures["memory_pj"]})
        total = self.total()
        mine = total.figures(prices, tokens)
        report = {
            "tokens": tokens,
            "precision": prices.precision,
            "e_ac_pj": prices.e_ac,
            "e_mac_pj": prices.e_mac,
            "ac_per_token": mine["ac"],
            "mac_per_token": mine["mac"],
            **{f"{name}_per_token": mine[name] for name in ("weight_reads", "state_reads", "state_writes",
                                                            "spike_reads", "spike_writes")},
            "spikes_per_token": total.spikes / tokens,
            "firing_rate": total.firing_rate,
            "firing_rate_per_layer": {layer: spikes[layer] / steps[layer] for layer in sorted(steps, key=_layer_order)},
            "pj_per_token": mine["compute_pj"],
            "compute_pj_per_token": mine["compute_pj"],
            "memory_pj_per_token": mine["memory_pj"],
            "total_pj_per_token": mine["total_pj"],
            "totals": {name: getattr(total, name) for name in COUNTED},
            "rows": rows,
        }
        if self.config is not None:
            summary = summarise(total, self.config, prices, tokens)
            gpt2 = summary["references"]["gpt2_fp32"]
            report.update(references=summary["references"], by_precision=summary["spikelm"]["by_precision"],
                          prices=summary["prices"], ann_mac_per_token=gpt2["mac"], ann_pj_per_token=gpt2["compute_pj"],
                          energy_ratio=mine["compute_pj"] / gpt2["compute_pj"])
        return report


def _add_to_row(totals, spikes, steps, quantity, layer, value):
    totals[quantity] += value
    if quantity == "spikes":
        spikes[layer] = spikes.get(layer, 0) + value
    elif quantity == "neuron_steps":
        steps[layer] = steps.get(layer, 0) + value


def _layer_order(layer):
    return (1, 0) if layer == "head" else (0, int(layer.split(".")[-1]))


def _row_order(key):
    return _layer_order(key[0]), KINDS.index(key[1])


def _layer_label(name):
    parts = name.split(".")
    if "layers" in parts and parts.index("layers") + 1 < len(parts):
        return "layers." + parts[parts.index("layers") + 1]
    return "head"


class CounterSwitch:
    """An EnergyCounter's stand-in under count_energy that passes every count on to `target`, a counter swapped
    between forwards (`use`): a long-running caller (the serving engine) installs the hooks once, instead of
    walking the model and registering them for every step. With no target, counts go nowhere."""

    def __init__(self):
        self.labels, self.config, self.target, self.memo = {}, None, None, {}

    # what the modules call on their `counter` (looked up at each call: bound to the target's own methods by
    # `use`, a few microseconds less for each of a decode step's ~50 calls than passing each one on)
    DIRECT = ("linear", "fired", "attention", "head_average")

    def use(self, counter: "EnergyCounter | None"):
        """Send the counts of the next forwards to `counter` (None: nowhere); returns it."""
        if counter is not None:
            counter.labels, counter.config, counter.memo = self.labels, self.config, self.memo
        self.target = counter
        for name in self.DIRECT:
            setattr(self, name, getattr(counter, name) if counter is not None else _ignore)
        return counter

    def _pass(name):
        def forward(self, *args, **kwargs):
            if self.target is not None:
                getattr(self.target, name)(*args, **kwargs)
        forward.__name__ = name
        return forward

    # what count_energy hooks up (hooks are bound once, so they pass each call on) and, until `use`, what the
    # modules call
    linear, norm, block, model = _pass("linear"), _pass("norm"), _pass("block"), _pass("model")
    fired, attention, head_average = _pass("fired"), _pass("attention"), _pass("head_average")
    del _pass


def _ignore(*args, **kwargs):
    """A switch's stand-in while it has no target."""


def _hook(counter, name):
    """The counter's method `name` as its class defines it (a switch's passes each call on to whatever counter
    it uses then; what `use` bound on the instance would stay bound to that one counter)."""
    return getattr(type(counter), name).__get__(counter)


@contextmanager
def count_energy(model, counter=None):
    """Switch the counters on for every forward inside the block (training, evaluation or generate()).

    >>> with count_energy(model) as counter:
    ...     model.generate(ids, max_new_tokens=8)
    >>> counter.report()["pj_per_token"]
    """
    counter = counter or EnergyCounter()
    counter.config = model.config
    handles, flagged = [], []
    in_stacks = set()  # the norms and blocks that the model's hook counts (EnergyCounter._stack_counts)
    for module in model.modules():
        if isinstance(module, SpikeLMModel):
            in_stacks.update(id(m) for block in module.layers for m in (block, block.attention_norm, block.mlp_norm))
            in_stacks.add(id(module.norm))
    for name, module in model.named_modules():
        counter.labels[module] = _layer_label(name)
        if id(module) in in_stacks:
            continue
        if isinstance(module, SpikeLinear):  # calls `counter.linear` itself
            module.counter = counter
            flagged.append(module)
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(_hook(counter, "linear")))
        elif isinstance(module, (nn.LayerNorm, SpikeLMRMSNorm)):
            handles.append(module.register_forward_hook(_hook(counter, "norm")))
        elif isinstance(module, SpikeLMBlock):
            handles.append(module.register_forward_hook(_hook(counter, "block")))
        elif isinstance(module, SpikeLMModel):
            handles.append(module.register_forward_hook(_hook(counter, "model"), with_kwargs=True))
        if isinstance(module, (SpikingNeuron, SpikeLMAttention, SpikeLMForCausalLM)):  # they call `counter`
            module.counter = counter
            flagged.append(module)
    try:
        yield counter
    finally:
        for handle in handles:
            handle.remove()
        for module in flagged:
            module.counter = None


@contextmanager
def count_inference(model, counter=None):
    """count_energy around inference: eval mode and no gradients inside the block, the model's mode after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), count_energy(model, counter) as counter:
            yield counter
    finally:
        model.train(was_training)


def energy_report(model, input_ids, attention_mask=None, e_ac=None, e_mac=None, precision="fp32",
                  prices: Prices | None = None):
    """Run `model` on `input_ids` [B, N] with the counters on; return per-token counts, operation, memory and
    total energy, and the references doing the same work on the same real tokens (see EnergyCounter.report)."""
    config = model.config
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    with count_inference(model) as counter:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    report = counter.report(e_ac, e_mac, precision, prices)
    report["config"] = {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
                        "num_attention_heads": config.num_attention_heads, "time_steps": config.time_steps,
                        "attention_type": config.attention_type, "vocab_size": config.vocab_size,
                        "context": input_ids.shape[1]}
    return report
