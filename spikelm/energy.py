"""Energy accounting: synaptic operations counted exactly from the spikes that flowed.

Rules (DESIGN.md section 3), one small pure function each, over counts:

- a weight matrix out x in fed spikes: out x (number of input spikes) accumulates (ACs);
  fed real values: out x in multiply-accumulates (MACs) per input vector;
- spike attention: what its recurrent form performs. The state update and the read-out add only where
  spikes are 1 (ACs); the decay, the decay sum and the scale are multiplications (MACs); a gated decay adds
  its matrix (fed spikes, as any other) and, per head and token, its sum over the steps, bias and sigmoid;
- neurons: per neuron and step, charging is a MAC (leak * v + x; an AC for IF, whose leak is 1) and the
  threshold comparison an AC; a soft reset subtracts the threshold once per spike (AC);
- the membrane shortcut adds each branch's output to the residual stream: an AC per element and step,
  reported in the `neurons` row (it is a membrane update);
- norms: their multiplications as MACs and additions as ACs, in their own row.

Energy = E_AC * ACs + E_MAC * MACs, with E_AC = 0.9 pJ and E_MAC = 4.6 pJ (32-bit floating point in 45 nm
CMOS, Horowitz 2014). The ANN reference is the same-shape GPT-2, all MACs: its weight matrices and its
attention products. It leaves out GPT-2's norms, softmax and GELU, so the comparison favours GPT-2.

Hooks and `counter` attributes only collect counts; the arithmetic lives in the rule functions.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .modeling_spikelm import SpikeLMAttention, SpikeLMBlock, SpikeLMForCausalLM, SpikeLMModel, SpikeLMRMSNorm
from .neurons import SpikingNeuron

E_AC_PJ = 0.9
E_MAC_PJ = 4.6
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
        rsqrt (1 MAC), normalise (D MACs), affine (D MACs)  ->  2D + 1 ACs, 3D + 3 MACs
    rmsnorm: squares (D MACs), scaling (1 MAC), + eps (1 AC), rsqrt (1 MAC), normalise (D MACs), gain (D MACs)
        ->  1 AC, 3D + 2 MACs
    """
    if norm_type == "layernorm":
        return (2 * width + 1) * vectors, (3 * width + 3) * vectors
    if norm_type == "rmsnorm":
        return vectors, (3 * width + 2) * vectors
    raise ValueError(f"no counting rule for norm {norm_type!r}")


def ssa_ops(time_steps: int, heads: int, head_dim: int, tokens: int, kv_pairs: int, q_spikes: int):
    """Recurrent spike self-attention, summed over tokens, steps and heads:
    S = gamma S + k v^T: d*d MACs (decay) per head and step; one AC per (k, v) spike pair.
    z = gamma z + 1: 1 MAC per head and token (shared by the T steps).
    a = q S: one d-wide row added per q spike: d ACs per q spike.
    a * scale / z: 1 MAC per head and token for scale / z, then d MACs per head and step.
    """
    ac = kv_pairs + q_spikes * head_dim
    mac = tokens * (time_steps * heads * head_dim * head_dim + heads + heads + time_steps * heads * head_dim)
    return ac, mac


def sdsa_ops(time_steps: int, heads: int, width: int, tokens: int, coincidences: int):
    """Recurrent channel-wise attention, summed over tokens and steps:
    S = gamma S + k*v: D MACs (decay) per step, one AC per coinciding k, v spike.
    z = gamma z + 1: 1 MAC per head and token; r = S / z: 1 MAC per head and token for 1 / z, D MACs per step.
    q masks the thresholded r: counted as D ACs per step (an AND is cheaper; we do not round in our favour).
    """
    ac = coincidences + tokens * time_steps * width
    mac = tokens * (time_steps * width + heads + heads + time_steps * width)
    return ac, mac


def gate_ops(time_steps: int, heads: int, tokens: int) -> tuple[int, int]:
    """A gated decay g = sigmoid(W_g s + b), per head and token, beyond W_g's own ACs (a weight matrix fed
    spikes): summing its T steps (T - 1 ACs), the 1/T of the mean (1 MAC), the bias (1 AC), the sigmoid
    1 / (1 + exp(-x)) (exp and reciprocal: 2 MACs, + 1: 1 AC). Multiplying the state and the decay sum by g
    costs what a fixed decay does (ssa_ops, sdsa_ops)."""
    per = tokens * heads
    return per * (time_steps - 1 + 1 + 1), per * (1 + 2)


def head_average_ops(vocab_size: int, tokens: int) -> tuple[int, int]:
    """Logits are the mean over T: the head's outputs accumulate over the steps (counted as its ACs), then one
    multiplication by 1/T per logit."""
    return 0, vocab_size * tokens


def gpt2_reference_counts(config, tokens, logits=None, context=None):
    """MACs of a same-shape GPT-2 (the width, depth, vocabulary and MLP of `config`) doing the work of one
    sequence of `tokens` real tokens with causal softmax attention and a KV cache.

    logits: positions whose logits it computes (default: every token; generate() keeps the last one of a
    prompt); context: the sum of the tokens' 1-based positions (default: one sequence, tokens (tokens + 1) / 2).
    Per token and layer: Q, K, V and output projections 4 D^2, MLP 2 D * inner. Attention at position p
    (1-based): q.k over p keys (D MACs each) and the weighted sum of p values (D MACs each).
    The LM head: V * D per logit. Norms, softmax and GELU are left out (in GPT-2's favour).
    Returns a dict of MACs.
    """
    D, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size  # a GPT2Config maps these too
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * D
    logits = tokens if logits is None else logits
    context = tokens * (tokens + 1) // 2 if context is None else context
    weights = tokens * L * (4 * D * D + 2 * D * inner)
    attention = L * 2 * D * context
    head = logits * V * D
    return {"weights": weights, "attention": attention, "head": head, "total": weights + attention + head}


def picojoules(ac, mac, e_ac=E_AC_PJ, e_mac=E_MAC_PJ):
    return e_ac * ac + e_mac * mac


# ================================================================ collecting


@dataclass
class EnergyCounts:
    """Exact counts of the work done for one sequence (one batch row), or summed over several.

    tokens: real positions processed; logits: real positions whose logits were computed; context: the sum over
    real positions of their 1-based position in their sequence (what softmax attention's cost grows with).
    """

    ac: int = 0
    mac: int = 0
    spikes: int = 0
    neuron_steps: int = 0
    tokens: int = 0
    logits: int = 0
    context: int = 0

    def __iadd__(self, other):
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def picojoules(self, e_ac=E_AC_PJ, e_mac=E_MAC_PJ) -> float:
        return picojoules(self.ac, self.mac, e_ac, e_mac)

    @property
    def firing_rate(self) -> float:
        return self.spikes / self.neuron_steps if self.neuron_steps else 0.0


def _is_binary(x):
    return not bool(((x != 0) & (x != 1)).any())


def _nonzeros_per_row(x, batch_dim=1):
    """Non-zeros of each batch row of x -> [B] int64."""
    return torch.count_nonzero(x.movedim(batch_dim, 0).reshape(x.shape[batch_dim], -1), dim=1)


class EnergyCounter:
    """Collects exact counts per batch row: operations per (layer, kind), spikes and neuron-steps per layer,
    real tokens, computed logits and positions. Every figure of the report is a sum over rows; `row(i)` gives
    one sequence's counts (the serving engine batches many sequences in one forward).

    positions: tokens each row has already processed before the counter starts (a decode step continues
    sequences whose earlier forwards another counter saw); a forward with no state to continue starts its
    rows' sequences afresh.
    """

    def __init__(self, positions=None):
        self.counts = {}  # (quantity, layer, kind) -> int64 [rows]; layer and kind are None where not per layer
        self.labels = {}  # module -> layer label
        self.config = None
        self._position = torch.as_tensor(positions if positions is not None else [], dtype=torch.int64)
        self._mask = None  # [B, n] real positions of the last forward

    def reset(self):
        self.counts.clear()
        self._position = torch.zeros(0, dtype=torch.int64)

    def _add(self, key, per_row, rows):
        """Add per-row counts (an int, the same for each row, or an int64 tensor [rows]) under `key`."""
        values = torch.as_tensor(per_row).to("cpu", torch.int64).expand(rows)
        stored = self.counts.get(key)
        if stored is None or len(stored) < rows:  # a wider batch than before: more rows
            grown = torch.zeros(rows, dtype=torch.int64)
            if stored is not None:
                grown[:len(stored)] = stored
            stored = grown
        stored[:rows] += values
        self.counts[key] = stored

    def add(self, layer, kind, ops, rows=1):
        ac, mac = ops
        self._add(("ac", layer, kind), ac, rows)
        self._add(("mac", layer, kind), mac, rows)

    # --- called by hooks and by the modules' `counter` attribute; tensors are [T, B, n, ...] (batch in dim 1)
    def linear(self, module, inputs, output):
        x = inputs[0]
        rows = x.shape[1]
        if _is_binary(x):
            ops = weight_ops_on_spikes(module.out_features, _nonzeros_per_row(x))
        else:
            ops = weight_ops_on_reals(module.out_features, module.in_features, x[:, 0].numel() // module.in_features)
        self.add(self.labels[module], "weights", ops, rows)
        if module.bias is not None:  # one addition per output (none of spikelm's matrices have a bias)
            self.add(self.labels[module], "weights", (output[:, 0].numel(), 0), rows)

    def norm(self, module, inputs, output):
        x = inputs[0]
        kind = "layernorm" if isinstance(module, nn.LayerNorm) else "rmsnorm"
        width = x.shape[-1]
        self.add(self.labels[module], "norms", norm_ops(kind, width, x[:, 0].numel() // width), x.shape[1])

    def block(self, module, inputs, output):
        membrane = inputs[0]  # [T, B, n, D]; two branches add into it
        width = membrane.shape[-1]
        self.add(self.labels[module], "neurons", residual_ops(width, 2 * membrane[:, 0].numel() // width),
                 membrane.shape[1])

    def __call__(self, neuron, spikes):  # a SpikingNeuron fired
        layer, rows = self.labels[neuron], spikes.shape[1]
        count = _nonzeros_per_row(spikes)
        neurons = spikes[0, 0].numel()
        leak_is_one = neuron.leak_logit is None and neuron.fixed_leak == 1.0
        self.add(layer, "neurons", neuron_ops(neurons, spikes.shape[0], count, leak_is_one, neuron.reset), rows)
        self._add(("spikes", layer, None), count, rows)
        self._add(("neuron_steps", layer, None), spikes[:, 0].numel(), rows)

    def attention(self, module, q, k, v, mask, attended):
        # per batch row, by its kind's rule (ssa_ops or sdsa_ops) and, with a gated decay, gate_ops
        self.add(self.labels[module], "attention", module.count_ops(q, k, v), q.shape[1])

    def head_average(self, module, logits):  # logits [B, n, V]
        rows, kept, vocab = logits.shape
        self.add("head", "weights", head_average_ops(vocab, kept), rows)
        self._add(("logits", None, None), self._mask[:, -kept:].sum(1), rows)

    def model(self, module, args, kwargs, output):
        # tokens are the real positions: padded ones are computed, and their cost is charged to the real ones
        spikes = output.spikes
        rows, n = spikes.shape[1], spikes.shape[2]
        mask = kwargs.get("attention_mask")
        self._mask = torch.ones(rows, n, dtype=torch.int64) if mask is None else (mask[:, -n:] != 0).long().cpu()
        real = self._mask.sum(1)
        if output.cache is None or output.cache.seen_tokens == n:  # a forward that starts its sequences
            self._position = torch.zeros(rows, dtype=torch.int64)
        elif len(self._position) < rows:
            self._position = torch.cat([self._position, torch.zeros(rows - len(self._position), dtype=torch.int64)])
        start = self._position[:rows]
        # sum of 1-based positions of this forward's real tokens: start+1 .. start+real
        self._add(("context", None, None), real * start + real * (real + 1) // 2, rows)
        self._add(("tokens", None, None), real, rows)
        self._position[:rows] += real

    # --- sums over rows
    def _sum(self, quantity):
        """{(layer, kind) or layer: count summed over rows} for a per-layer quantity."""
        return {(key[1] if key[2] is None else key[1:]): int(value.sum())
                for key, value in self.counts.items() if key[0] == quantity}

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
        return int(self.counts[("tokens", None, None)].sum()) if ("tokens", None, None) in self.counts else 0

    @property
    def rows(self) -> int:
        return max((len(v) for v in self.counts.values()), default=0)

    def row(self, i) -> EnergyCounts:
        """The counts of batch row i, summed over layers."""
        def total(quantity):
            return sum(int(v[i]) for k, v in self.counts.items() if k[0] == quantity and i < len(v))
        return EnergyCounts(**{name: total(name) for name in EnergyCounts.__dataclass_fields__})

    def row_firing_rate_per_layer(self, i) -> dict[str, float]:
        """Spikes per neuron and time step of batch row i, by layer ("layers.0", ..., "head"), in layer order."""
        spikes, steps = ({k[1]: int(v[i]) for k, v in self.counts.items() if k[0] == quantity and i < len(v)}
                         for quantity in ("spikes", "neuron_steps"))
        return {layer: spikes[layer] / steps[layer] for layer in sorted(steps, key=_layer_order) if steps[layer]}

    def total(self) -> EnergyCounts:
        counts = EnergyCounts()
        for i in range(self.rows):
            counts += self.row(i)
        return counts

    # --- results
    def report(self, e_ac=E_AC_PJ, e_mac=E_MAC_PJ):
        """Per-token figures, and the same-shape GPT-2's for the same work (when the model's config is known)."""
        if self.tokens == 0:
            raise ValueError("the energy counter saw no tokens: run the model inside count_energy(model)")
        tokens = self.tokens
        ac, mac, spikes, steps = self.ac, self.mac, self.spikes, self.neuron_steps
        rows = []
        for layer, kind in sorted(set(ac) | set(mac), key=_row_order):
            row_ac, row_mac = ac.get((layer, kind), 0) / tokens, mac.get((layer, kind), 0) / tokens
            rows.append({"layer": layer, "kind": kind, "ac": row_ac, "mac": row_mac,
                         "pj": picojoules(row_ac, row_mac, e_ac, e_mac)})
        total = self.total()
        report = {
            "tokens": tokens,
            "e_ac_pj": e_ac,
            "e_mac_pj": e_mac,
            "ac_per_token": total.ac / tokens,
            "mac_per_token": total.mac / tokens,
            "spikes_per_token": total.spikes / tokens,
            "firing_rate": total.firing_rate,
            "firing_rate_per_layer": {layer: spikes[layer] / steps[layer] for layer in sorted(steps, key=_layer_order)},
            "pj_per_token": total.picojoules(e_ac, e_mac) / tokens,
            "totals": {"ac": total.ac, "mac": total.mac, "spikes": total.spikes, "neuron_steps": total.neuron_steps},
            "rows": rows,
        }
        if self.config is not None:
            reference = gpt2_reference_counts(self.config, total.tokens, logits=total.logits, context=total.context)
            report["ann_mac_per_token"] = reference["total"] / tokens
            report["ann_pj_per_token"] = e_mac * reference["total"] / tokens
            report["energy_ratio"] = report["pj_per_token"] / report["ann_pj_per_token"]
        return report


def _layer_order(layer):
    return (1, 0) if layer == "head" else (0, int(layer.split(".")[-1]))


def _row_order(key):
    return _layer_order(key[0]), KINDS.index(key[1])


def _layer_label(name):
    parts = name.split(".")
    if "layers" in parts and parts.index("layers") + 1 < len(parts):
        return "layers." + parts[parts.index("layers") + 1]
    return "head"


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
    for name, module in model.named_modules():
        counter.labels[module] = _layer_label(name)
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(counter.linear))
        elif isinstance(module, (nn.LayerNorm, SpikeLMRMSNorm)):
            handles.append(module.register_forward_hook(counter.norm))
        elif isinstance(module, SpikeLMBlock):
            handles.append(module.register_forward_hook(counter.block))
        elif isinstance(module, SpikeLMModel):
            handles.append(module.register_forward_hook(counter.model, with_kwargs=True))
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


def energy_report(model, input_ids, attention_mask=None, e_ac=E_AC_PJ, e_mac=E_MAC_PJ):
    """Run `model` on `input_ids` [B, N] with the counters on; return per-token counts, energy and the
    same-shape GPT-2 reference for the same real tokens (see EnergyCounter.report for the fields)."""
    config = model.config
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    with count_inference(model) as counter:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    report = counter.report(e_ac, e_mac)
    report["config"] = {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
                        "num_attention_heads": config.num_attention_heads, "time_steps": config.time_steps,
                        "attention_type": config.attention_type, "vocab_size": config.vocab_size,
                        "context": input_ids.shape[1]}
    return report
