"""Event-driven matmuls: a weight matrix fed sparse spikes reads only the weights of its firing inputs.

A dense matmul of a spike vector s (0 or 1, firing rate r) with W reads all of W; but W s is the sum of the
columns of W whose input fired. With W stored transposed (`weight_t` [in, out]) each firing input selects one
contiguous row, so for small batches (decode: T * B rows of spikes) gathering and summing those rows reads
about r of the weights:

    rows, inputs = nonzero(s)                     # one (row, input) pair per spike
    out[rows] += weight_t[inputs]                 # index_add_: each output row sums its rows in input order

The LM head is fed per-token spike counts (whole numbers 0..T): each selected row is scaled by its count.

Numbers: in float64 every sum of float32 weights is exact, so both paths give the same logits bit for bit; in
float32 they differ by rounding only. The gather-sum adds each output row's terms one by one in the order of
its inputs, whatever the other rows are: its result does not depend on the batch (`batch_invariant`, which the
server uses to run float32 with a sequence's numbers the same alone or in a batch).

When it pays: `EVENT_DRIVEN_MAX_RATE` is the firing rate below which the gather-sum beat the dense matmul in
`spikelm bench`'s crossover measurement (`event_driven.crossover`, one thread, T=4, batch 1, fp32, shapes
256x1024 to 4096x1024: 1.8x to 17x faster at 5% firing, 1.3x to 4.6x at 10%, mostly slower from 15%);
`EVENT_DRIVEN_MAX_ROWS` keeps it to small batches. Training (autograd on) always takes the dense matmul.
"""

import time

import torch
import torch.nn.functional as F
from torch import nn

# spikes / inputs up to which the gather-sum is used: in `spikelm bench --threads 1` (2026-12-02, busy 2-core VM)
# it was faster than dense at 10% firing in every shape (1.3x to 4.6x), slower at 15% in three of four
EVENT_DRIVEN_MAX_RATE = 0.12
EVENT_DRIVEN_MAX_ROWS = 256  # input vectors per call (T * batch * tokens) up to which it is considered



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
    """x: [..., in] spikes (or, counts=True, whole-number spike counts); weight_t: [in, out] -> [..., out].

    Equal to x @ weight_t (float64: exactly). One (row, input) pair per non-zero input; the weight rows of the
    pairs are gathered and added into their output rows in input order."""
    flat = x.reshape(-1, x.shape[-1])
    rows, inputs = flat.nonzero(as_tuple=True)
    return _gather_sum(flat, rows, inputs, weight_t, counts).view(*x.shape[:-1], weight_t.shape[1])


def _gather_sum(flat, rows, inputs, weight_t, counts):
    selected = weight_t.index_select(0, inputs)  # [spikes, out]: contiguous rows
    if counts:
        selected = selected * flat[rows, inputs].unsqueeze(1)  # a count c adds its row c times
    out = torch.zeros(flat.shape[0], weight_t.shape[1], dtype=weight_t.dtype, device=weight_t.device)
    return out.index_add_(0, rows, selected)


class SpikeLinear(nn.Linear):
    """nn.Linear for a matrix fed spikes (or, `counts`, per-token spike counts): at inference with a small
    batch and sparse input, the event-driven gather-sum; otherwise the dense matmul. Same parameters and state
    dict as nn.Linear; the transposed copy of the weight is made on first use and remade when the weight
    changes (training, loading, `.to()`)."""

    def __init__(self, in_features, out_features, bias=False, counts=False, **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.counts = counts
        self.event_driven = True  # at inference, the gather-sum where it pays (set_event_driven)
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
        if not invariant and flat.shape[0] > EVENT_DRIVEN_MAX_ROWS:
            return super().forward(x)
        rows, inputs = flat.nonzero(as_tuple=True)
        if not invariant and rows.numel() > EVENT_DRIVEN_MAX_RATE * flat.numel():
            return super().forward(x)  # too many spikes: the dense matmul is faster
        out = _gather_sum(flat, rows, inputs, self.weight_t(), self.counts)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return super().extra_repr() + (", fed spike counts" if self.counts else ", fed spikes")


def crossover(shapes=((256, 1024), (1024, 256), (1024, 4096), (4096, 1024)), rates=(0.05, 0.1, 0.15, 0.2, 0.3),
              time_steps=4, repeats=50, dtype=torch.float32):
    """Measure dense vs gather-sum time for one decode step's spikes ([T, in], batch 1) at several firing
    rates -> rows of {in, out, rate, dense_us, event_us, speedup}, and per shape the highest rate at which the
    gather-sum was faster (`spikelm bench` reports them; EVENT_DRIVEN_MAX_RATE is set from such a run)."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for d_in, d_out in shapes:
        weight = torch.randn(d_out, d_in, generator=generator, dtype=dtype)
        weight_t = weight.t().contiguous()
        for rate in rates:
            spikes = (torch.rand(time_steps, d_in, generator=generator) < rate).to(dtype)
            timings = {}
            for name, fn in (("dense", lambda: F.linear(spikes, weight)),
                             ("event", lambda: event_driven_matmul(spikes, weight_t))):
                for _ in range(3):
                    fn()
                best = float("inf")
                for _ in range(5):
                    start = time.perf_counter()
                    for _ in range(repeats):
                        fn()
                    best = min(best, (time.perf_counter() - start) / repeats)
                timings[name] = best * 1e6
            rows.append({"in": d_in, "out": d_out, "rate": rate, "dense_us": timings["dense"],
                         "event_us": timings["event"], "speedup": timings["dense"] / timings["event"]})
    faster = {}
    for row in rows:
        key = f"{row['in']}x{row['out']}"
        if row["speedup"] > 1:
            faster[key] = max(faster.get(key, 0.0), row["rate"])
        else:
            faster.setdefault(key, 0.0)
    return {"rows": rows, "highest_rate_faster": faster}
