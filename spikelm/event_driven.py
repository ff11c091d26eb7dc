"""Event-driven matmuls: a weight matrix fed sparse spikes reads only the weights of its firing inputs.

A dense matmul of a spike vector s (0 or 1) with W reads all of W; but W s is the sum of the columns of W whose
input fired. With W stored transposed (`weight_t` [in, out]) each firing input selects one contiguous row. Two
forms, both for small batches (decode: T * B rows of spikes):

- compacted (the default inference path): the inputs that fire at any of the T steps (or in any row) are found
  once, their rows of W are gathered once, and a small dense matmul sums them:
      active = nonzero(any(s, over rows))
      out = s[:, active] @ weight_t[active]
  A neuron that fires at one step often fires at the next, so the active set is about 1.3x the per-step firing
  rate (a trained model's decode, T=2): each weight row is read once however many steps fired it.
- gather-sum (the batch-invariant path): one (row, input) pair per spike, and each output row adds its gathered
  weight rows one by one in the order of its inputs, whatever the other rows are:
      rows, inputs = nonzero(s)
      out[rows] += weight_t[inputs]                 # index_add_
  Its result does not depend on the batch (`batch_invariant`), which the server uses to run float32 with a
  sequence's numbers the same alone or in a batch of 32.

The LM head is fed per-token spike counts (whole numbers 0..T): the compacted form multiplies by the counts as
they are; the gather-sum scales each selected row by its count.

Numbers: in float64 every sum of float32 weights is exact, so both forms give the dense path's logits bit for
bit; in float32 they differ by rounding only.

When it pays: a decode step reads each matrix once, after the other layers have pushed it out of the cache, so
the dense matmul costs a pass over all of W from memory and the compacted one a pass over the active fraction.
`crossover()` measures exactly that (each shape's weights cycled through more memory than the cache holds);
`EVENT_DRIVEN_MAX_ACTIVE` is the active fraction below which the compacted form won in every shape there.
Training (autograd on) always takes the dense matmul.
"""

import time

import torch
import torch.nn.functional as F
from torch import nn

# Active inputs / inputs up to which the compacted matmul is used. `crossover()` (2026-12-02, one thread, idle
# 2-core Zen 4 VM with 32 MiB of L3, weights cycled through 96 MiB), compacted over dense at active fractions
# 0.1 / 0.3 / 0.5 / 0.7: 2.9-6.6x / 1.3-2.8x / 1.07-1.6x / 0.74-1.09x over shapes 256x1024 to 4096x1024.
EVENT_DRIVEN_MAX_ACTIVE = 0.5
EVENT_DRIVEN_MAX_ROWS = 256  # input vectors per call (T * batch * tokens) up to which it is considered
# Below this many weights a matrix is read from cache anyway and the dense matmul's one call is cheaper than the
# compacted form's five (the gate's [H, D] matrix; 256x256 already gains 1.6x at active fraction 0.2).
EVENT_DRIVEN_MIN_WEIGHTS = 32768
# the cache-flushing pool of crossover(): more than the last-level caches of the machines we run on
CROSSOVER_POOL_BYTES = 96 << 20
CROSSOVER_SHAPES = ((256, 1024), (1024, 256), (1024, 4096), (4096, 1024))  # [in, out] of `base` to `medium`


def set_event_driven(model, enabled: bool = True):
    """Let `model`'s spike-fed matrices take the event-driven path where it pays (the default), or never."""
    for module in model.modules():
        if isinstance(module, SpikeLinear):
            module.event_driven = enabled


def set_batch_invariant(model, enabled: bool = True):
    """At inference, always use the gather-sum in `model`, whatever the rate and batch: every output row is
    then summed in a fixed order of its own inputs, so a sequence's numbers do not depend on its batch
    neighbours (the server's float32 engine)."""
    for module in model.modules():
        if isinstance(module, SpikeLinear):
            module.batch_invariant = enabled


def event_driven_matmul(x, weight_t, counts: bool = False):
    """The gather-sum. x: [..., in] spikes (or, counts=True, whole-number spike counts); weight_t: [in, out] ->
    [..., out], equal to x @ weight_t (float64: exactly). One (row, input) pair per non-zero input; the weight rows
    of the pairs are gathered and added into their output rows in input order (batch-invariant)."""
    flat = x.reshape(-1, x.shape[-1])
    rows, inputs = flat.nonzero(as_tuple=True)
    return _gather_sum(flat, rows, inputs, weight_t, counts).view(*x.shape[:-1], weight_t.shape[1])


def compacted_matmul(x, weight_t):
    """The compacted form. x: [..., in] spikes or spike counts; weight_t: [in, out] -> [..., out], equal to
    x @ weight_t (float64: exactly): only the weight rows of inputs non-zero in some row are read, each once."""
    flat = x.reshape(-1, x.shape[-1])
    active = flat.any(0).nonzero().squeeze(1)
    return _compacted(flat, active, weight_t).view(*x.shape[:-1], weight_t.shape[1])


def _compacted(flat, active, weight_t):
    return flat.index_select(1, active) @ weight_t.index_select(0, active)


def _gather_sum(flat, rows, inputs, weight_t, counts):
    selected = weight_t.index_select(0, inputs)  # [spikes, out]: contiguous rows
    if counts:
        selected = selected * flat[rows, inputs].unsqueeze(1)  # a count c adds its row c times
    out = torch.zeros(flat.shape[0], weight_t.shape[1], dtype=weight_t.dtype, device=weight_t.device)
    return out.index_add_(0, rows, selected)


class SpikeLinear(nn.Linear):
    """nn.Linear for a matrix fed spikes (or, `counts`, per-token spike counts): at inference with a small
    batch and sparse input, the event-driven compacted matmul (or, `batch_invariant`, the gather-sum);
    otherwise the dense matmul. Same parameters and state dict as nn.Linear; the transposed copy of the weight
    is made on first use and remade when the weight changes (training, loading, `.to()`)."""

    def __init__(self, in_features, out_features, bias=False, counts=False, **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.counts = counts
        self.event_driven = True  # at inference, the compacted matmul where it pays (set_event_driven)
        self.batch_invariant = False  # at inference, always the gather-sum (set_batch_invariant)
        self._weight_t = None
        self._weight_key = None

    def weight_t(self):
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._weight_key != key:
            with torch.no_grad():
                self._weight_t = w.detach().t().contiguous()
            self._weight_key = key
        return self._weight_t

    def forward(self, x):
        invariant = self.batch_invariant
        if torch.is_grad_enabled() or not (self.event_driven or invariant) or x.dim() < 2 or \
                torch.compiler.is_compiling():  # a compiled step: static shapes, the dense matmul
            return super().forward(x)
        flat = x.reshape(-1, x.shape[-1])
        if invariant:
            rows, inputs = flat.nonzero(as_tuple=True)
            out = _gather_sum(flat, rows, inputs, self.weight_t(), self.counts)
        else:
            if flat.shape[0] > EVENT_DRIVEN_MAX_ROWS or self.weight.numel() < EVENT_DRIVEN_MIN_WEIGHTS:
                return super().forward(x)
            active = flat.any(0).nonzero().squeeze(1)
            if active.numel() > EVENT_DRIVEN_MAX_ACTIVE * self.in_features:
                return super().forward(x)  # too many active inputs: the dense matmul is faster
            out = _compacted(flat, active, self.weight_t())
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return super().extra_repr() + (", fed spike counts" if self.counts else ", fed spikes")


def crossover(shapes=CROSSOVER_SHAPES, active=(0.1, 0.3, 0.5, 0.7),
              time_steps=4, fire_when_active=0.7, passes=3, pool_bytes=CROSSOVER_POOL_BYTES, dtype=torch.float32):
    """Dense against compacted against gather-sum time for one decode step's spikes ([T, in], batch 1), as a
    decode step meets them: each shape's matrix is copied until the copies fill `pool_bytes` (more than the
    cache) and every timing pass visits each copy once, so each call reads its weights from memory. Spikes: a
    fraction `active` of the inputs may fire, each at each step with probability `fire_when_active`.
    -> rows of {in, out, active, rate, dense_us, compacted_us, gather_us, speedup} (speedup: dense over
    compacted, best of `passes`), and per shape the highest active fraction at which the compacted form was
    faster (`spikelm bench` reports them; EVENT_DRIVEN_MAX_ACTIVE is set from such a run)."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for d_in, d_out in shapes:
        copies = max(2, pool_bytes // (d_in * d_out * torch.finfo(dtype).bits // 8))
        weights = [torch.randn(d_out, d_in, generator=generator, dtype=dtype) for _ in range(copies)]
        weights_t = [w.t().contiguous() for w in weights]
        for fraction in active:
            may_fire = torch.rand(d_in, generator=generator) < fraction
            spikes = ((torch.rand(time_steps, d_in, generator=generator) < fire_when_active) & may_fire).to(dtype)
            timings = {}
            for name, fn in (("dense", lambda k: F.linear(spikes, weights[k])),
                             ("compacted", lambda k: compacted_matmul(spikes, weights_t[k])),
                             ("gather", lambda k: event_driven_matmul(spikes, weights_t[k]))):
                best = float("inf")
                for _ in range(passes + 1):  # the first pass warms up
                    start = time.perf_counter()
                    for k in range(copies):
                        fn(k)
                    best = min(best, (time.perf_counter() - start) / copies)
                timings[name] = best * 1e6
            rows.append({"in": d_in, "out": d_out, "active": float(spikes.any(0).float().mean()),
                         "rate": float(spikes.mean()), "dense_us": timings["dense"],
                         "compacted_us": timings["compacted"], "gather_us": timings["gather"],
                         "speedup": timings["dense"] / timings["compacted"]})
    faster = {}
    for row in rows:
        key = f"{row['in']}x{row['out']}"
        faster[key] = max(faster.get(key, 0.0), row["active"] if row["speedup"] > 1 else 0.0)
    return {"rows": rows, "highest_active_faster": faster}
