"""Energy accounting: synaptic operations counted exactly from the spikes that flowed.

Rules (docs/design.md, "Energy"), one small pure function each, over counts:

- a weight matrix out x in fed spikes: out x (number of input spikes) accumulates (ACs);
  fed real values: out x in multiply-accumulates (MACs) per input vector;
- spike attention: what its recurrent form performs. The state update and the read-out add only where
  spikes are 1 (ACs); the decay, the decay sum and the scale are multiplications (MACs);
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

from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import nn

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


def head_average_ops(vocab_size: int, tokens: int) -> tuple[int, int]:
    """Logits are the mean over T: the head's outputs accumulate over the steps (counted as its ACs), then one
    multiplication by 1/T per logit."""
    return 0, vocab_size * tokens


def gpt2_reference_counts(hidden_size, num_layers, vocab_size, tokens, intermediate_size=None):
    """MACs of a same-shape GPT-2 processing a sequence of `tokens` tokens with causal softmax attention.

    Per token and layer: Q, K, V and output projections 4 D^2, MLP 2 D * inner. Attention at position i
    (0-based): q.k over i+1 keys (D MACs each) and the weighted sum of i+1 values (D MACs each).
    The LM head: V * D per token. Norms, softmax and GELU are left out (in GPT-2's favour).
    Returns a dict of MACs for the whole sequence.
    """
    inner = intermediate_size or 4 * hidden_size
    weights = tokens * num_layers * (4 * hidden_size * hidden_size + 2 * hidden_size * inner)
    attention = num_layers * 2 * hidden_size * (tokens * (tokens + 1) // 2)
    head = tokens * vocab_size * hidden_size
    return {"weights": weights, "attention": attention, "head": head, "total": weights + attention + head}


def picojoules(ac, mac, e_ac=E_AC_PJ, e_mac=E_MAC_PJ):
    return e_ac * ac + e_mac * mac


# ================================================================ collecting


def _is_binary(x):
    return not bool(((x != 0) & (x != 1)).any())


class EnergyCounter:
    """Collects exact operation counts per (layer, kind), spikes and neuron-steps per layer, and tokens."""

    def __init__(self):
        self.ac = defaultdict(int)
        self.mac = defaultdict(int)
        self.spikes = defaultdict(int)
        self.neuron_steps = defaultdict(int)
        self.tokens = 0
        self.labels = {}  # module -> layer label
        self.config = None

    def reset(self):
        self.ac.clear(), self.mac.clear(), self.spikes.clear(), self.neuron_steps.clear()
        self.tokens = 0

    def add(self, layer, kind, ops):
        ac, mac = ops
        self.ac[(layer, kind)] += int(ac)
        self.mac[(layer, kind)] += int(mac)

    # --- called by hooks and by the modules' `counter` attribute
    def linear(self, module, inputs, output):
        x = inputs[0]
        if _is_binary(x):
            ops = weight_ops_on_spikes(module.out_features, int(torch.count_nonzero(x)))
        else:
            ops = weight_ops_on_reals(module.out_features, module.in_features, x.numel() // module.in_features)
        self.add(self.labels[module], "weights", ops)
        if module.bias is not None:  # one addition per output (none of spikelm's matrices have a bias)
            self.add(self.labels[module], "weights", (output.numel(), 0))

    def norm(self, module, inputs, output):
        kind = "rmsnorm" if not isinstance(module, nn.LayerNorm) else "layernorm"
        width = inputs[0].shape[-1]
        self.add(self.labels[module], "norms", norm_ops(kind, width, inputs[0].numel() // width))

    def block(self, module, inputs, output):
        membrane = inputs[0]  # [T, B, n, D]; two branches add into it
        self.add(self.labels[module], "neurons", residual_ops(membrane.shape[-1], 2 * membrane.numel() // membrane.shape[-1]))

    def __call__(self, neuron, spikes):  # a SpikingNeuron fired
        layer = self.labels[neuron]
        count = int(torch.count_nonzero(spikes))
        neurons = spikes[0].numel()
        leak_is_one = neuron.leak_logit is None and neuron.fixed_leak == 1.0
        self.add(layer, "neurons", neuron_ops(neurons, spikes.shape[0], count, leak_is_one, neuron.reset))
        self.spikes[layer] += count
        self.neuron_steps[layer] += spikes.numel()

    def attention(self, module, q, k, v, mask, attended):
        layer = self.labels[module]
        T, B, n, D = q.shape
        H, d = module.num_heads, module.head_dim
        if module.kind == "ssa":
            k_count = k.reshape(T, B, n, H, d).sum(-1).long()
            v_count = v.reshape(T, B, n, H, d).sum(-1).long()
            pairs = int((k_count * v_count).sum())
            ops = ssa_ops(T, H, d, B * n, pairs, int(torch.count_nonzero(q)))
        else:
            ops = sdsa_ops(T, H, D, B * n, int(torch.count_nonzero(k * v)))
        self.add(layer, "attention", ops)

    def head_average(self, module, logits):
        self.add("head", "weights", head_average_ops(logits.shape[-1], logits.numel() // logits.shape[-1]))

    def model(self, module, args, kwargs, output):
        # tokens are the real positions: padded ones are computed, and their cost is charged to the real ones
        spikes = output.spikes
        mask = kwargs.get("attention_mask")
        if mask is None:
            self.tokens += spikes.shape[1] * spikes.shape[2]
        else:
            self.tokens += int(torch.count_nonzero(mask[:, -spikes.shape[2]:]))

    # --- results
    def report(self, e_ac=E_AC_PJ, e_mac=E_MAC_PJ, reference_macs=None):
        """Per-token figures. `reference_macs`: the ANN reference's MACs for the same tokens."""
        if self.tokens == 0:
            raise ValueError("the energy counter saw no tokens: run the model inside count_energy(model)")
        tokens = self.tokens
        keys = sorted(set(self.ac) | set(self.mac), key=_row_order)
        rows = []
        for layer, kind in keys:
            ac, mac = self.ac[(layer, kind)] / tokens, self.mac[(layer, kind)] / tokens
            rows.append({"layer": layer, "kind": kind, "ac": ac, "mac": mac, "pj": picojoules(ac, mac, e_ac, e_mac)})
        total_ac = sum(self.ac.values())
        total_mac = sum(self.mac.values())
        total_spikes = sum(self.spikes.values())
        total_steps = sum(self.neuron_steps.values())
        report = {
            "tokens": tokens,
            "e_ac_pj": e_ac,
            "e_mac_pj": e_mac,
            "ac_per_token": total_ac / tokens,
            "mac_per_token": total_mac / tokens,
            "spikes_per_token": total_spikes / tokens,
            "firing_rate": total_spikes / total_steps if total_steps else 0.0,
            "firing_rate_per_layer": {layer: self.spikes[layer] / self.neuron_steps[layer]
                                      for layer in sorted(self.neuron_steps, key=_layer_order)},
            "pj_per_token": picojoules(total_ac, total_mac, e_ac, e_mac) / tokens,
            "totals": {"ac": total_ac, "mac": total_mac, "spikes": total_spikes, "neuron_steps": total_steps},
            "rows": rows,
        }
        if reference_macs is not None:
            report["ann_mac_per_token"] = reference_macs / tokens
            report["ann_pj_per_token"] = e_mac * reference_macs / tokens
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
        cls = type(module).__name__
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(counter.linear))
        elif isinstance(module, nn.LayerNorm) or cls.endswith("RMSNorm"):
            handles.append(module.register_forward_hook(counter.norm))
        elif cls.endswith("Block"):
            handles.append(module.register_forward_hook(counter.block))
        elif cls == "SpikeLMModel":
            handles.append(module.register_forward_hook(counter.model, with_kwargs=True))
        if hasattr(module, "counter") and cls != "SpikeLMModel":  # neurons, attention, the LM head's average
            module.counter = counter
            flagged.append(module)
    try:
        yield counter
    finally:
        for handle in handles:
            handle.remove()
        for module in flagged:
            module.counter = None


def energy_report(model, input_ids, attention_mask=None, e_ac=E_AC_PJ, e_mac=E_MAC_PJ):
    """Run `model` on `input_ids` [B, N] with the counters on; return per-token counts, energy and the
    same-shape GPT-2 reference (see EnergyCounter.report for the fields)."""
    config = model.config
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    was_training = model.training
    model.eval()
    with torch.no_grad(), count_energy(model) as counter:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    model.train(was_training)
    reference = gpt2_reference_counts(config.hidden_size, config.num_hidden_layers, config.vocab_size,
                                      input_ids.shape[1], config.intermediate_size)
    report = counter.report(e_ac, e_mac, reference_macs=reference["total"] * input_ids.shape[0])
    report["config"] = {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
                        "num_attention_heads": config.num_attention_heads, "time_steps": config.time_steps,
                        "attention_type": config.attention_type, "vocab_size": config.vocab_size,
                        "context": input_ids.shape[1]}
    return report
