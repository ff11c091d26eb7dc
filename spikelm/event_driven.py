"""Event-driven matmuls: a weight matrix fed sparse spikes reads only the weights of its firing inputs.

A dense matmul of a spike vector s (0 or 1) with W reads all of W; but W s is the sum of the columns of W whose
input fired. With W stored transposed (`weight_t` [in, out]) each firing input selects one contiguous row. For
small batches (decode: T * B rows of spikes) three forms compute it, all at inference only:

- the C kernel (`spikelm.kernels.spike_matmul`, the default where a C compiler is at hand): for each input that
  fires in some row, its weight row is read once and added into the rows where it fired, in increasing input
  order.
  One call; a neuron that fires at one step often fires at the next (the active set is about 1.3x the per-step
  firing rate in a trained model's decode), and its row is read once however many steps fired it.
- compacted (PyTorch, where there is no C compiler): the inputs active in some row are found once, their
  weight rows gathered once, and a small dense matmul sums them:
      active = nonzero(any(s, over rows));  out = s[:, active] @ weight_t[active]
- gather-sum (PyTorch, batch-invariant where there is no C compiler): one (row, input) pair per spike,
      rows, inputs = nonzero(s);  out[rows] += weight_t[inputs]          # index_add_, in input order

The C kernel and the gather-sum add each output row's terms one by one in the order of its inputs, whatever the
other rows are: a row's result does not depend on the batch (`batch_invariant`, which the server uses to run
float32 with a sequence's numbers the same alone or in a batch of 32), and the two give the same numbers.
The LM head is fed per-token spike counts (whole numbers 0..T): each selected row is scaled by its count.

Numbers: in float64 every sum of float32 weights is exact, so every form gives the dense path's logits bit for
bit; in float32 they differ by rounding only.

When it pays: a decode step reads each matrix once, after the other layers have pushed it out of the cache, so
the dense matmul costs a pass over all of W from memory and the event-driven forms a pass over the active
rows. `crossover()` measures exactly that (each shape's weights cycled through more memory than the cache
holds); the EVENT_DRIVEN_MAX_ constants are set from it.

Training (autograd on, many rows) has the same sparsity: every matrix's input is spikes, at firing rates of
0.02-0.23 in the models we train. `SpikeMatmul` computes the forward (x W^T) and the weight's gradient
(g^T x) over the firing inputs only, with the C kernels; the input's gradient (g W) stays a dense matmul, since
the surrogate gradient reaches every input. Where the input is busier than TRAINING_MAX_RATE, or there is no C
compiler, the dense matmul runs.
"""

import time

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import count_nonzero as count_nonzero_kernel
from .kernels import spike_grad_weight as spike_grad_weight_kernel
from .kernels import spike_matmul as spike_matmul_kernel
from .kernels import spike_matmul_rows as spike_matmul_rows_kernel
from .kernels import supports as kernel_supports

# Measured by `crossover()` (2026-12-02, one thread, idle 2-core Zen 4 VM with 32 MiB of L3, weights cycled
# through 96 MiB), shapes 256x1024 to 4096x1024:
# - spikes / inputs up to which the C kernel is used: with one sequence's T=4 rows it beat dense at firing rates
#   0.07 / 0.21 / 0.33 / 0.49 by 3.6-20x / 1.4-4.0x / 1.2-2.8x / 0.9-2.2x; with 8 sequences (32 rows) by
#   1.5-4.8x / 1.02-2.6x / 0.87-1.5x / 0.78-1.6x.
#   With one row (the LM head fed one token's spike counts) it beat dense at every rate: 2.2-4.6x at 0.3, 1.3-2.2x
#   at 0.9 (256x4096, 1024x4096, 512x8192): it reads the active rows once and nothing else.
EVENT_DRIVEN_MAX_RATE_ONE_ROW = 1.0
EVENT_DRIVEN_MAX_RATE_ONE_SEQUENCE = 0.33  # up to 8 rows
EVENT_DRIVEN_MAX_RATE = 0.2  # more rows
# - active inputs / inputs up to which the compacted matmul is used: compacted over dense at active fractions
#   0.1 / 0.3 / 0.5 / 0.7: 2.9-6.6x / 1.3-2.8x / 1.07-1.6x / 0.74-1.09x
EVENT_DRIVEN_MAX_ACTIVE = 0.5
EVENT_DRIVEN_MAX_ROWS = 256  # input vectors per call (T * batch * tokens) up to which it is considered
# Below this many weights a matrix is read from cache anyway and the dense matmul's one call is as cheap (the
# gate's [H, D] matrix; 256x256 already gains 1.6x at active fraction 0.2).
EVENT_DRIVEN_MIN_WEIGHTS = 32768
# Training (autograd on, the CPU, the C kernels at hand): a matrix whose input has at most this fraction of
# non-zeros takes `SpikeMatmul` (forward and weight gradient summed over the firing inputs only). Measured
# (2026-12-02, one thread, 8192 rows = T * batch * tokens, [in, out] 256x1024 / 1024x256 / 512x512, uniformly
# random spikes): forward plus weight gradient over the dense pair, at firing rates 0.1 / 0.2 / 0.3 / 0.4 / 0.5 /
# 0.6: 3.8-6.1x / 2.9-3.8x / 2.4-2.9x / 1.9-2.1x / 1.1-1.5x / 1.1-1.2x. A random-init model's own spikes fire at
# 0.02-0.22, a trained `small` model's at 0.007-0.23.
TRAINING_MAX_RATE = 0.5
TRAINING_MIN_ROWS = 512  # fewer rows: the count and the call cost more than they save
# the cache-flushing pool of crossover(): more than the last-level caches of the machines we run on
CROSSOVER_POOL_BYTES = 96 << 20
CROSSOVER_SHAPES = ((256, 1024), (1024, 256), (1024, 4096), (4096, 1024))  # [in, out] of `base` to `medium`


def set_event_driven(model, enabled: bool = True):
    """Let `model`'s spike-fed matrices take the event-driven path where it pays (the default), or never."""
    for module in model.modules():
        if isinstance(module, SpikeLinear):
            module.event_driven = enabled


def set_batch_invariant(model, enabled: bool = True):
    """At inference, always sum event-driven in `model` (the C kernel, else the gather-sum), whatever the rate
    and batch: every output row is then summed in a fixed order of its own inputs, so a sequence's numbers do
    not depend on its batch neighbours (the server's float32 engine)."""
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


class SpikeMatmul(torch.autograd.Function):
    """x @ W.T for a matrix fed spikes, in training: the forward sums the weight rows of each row's firing
    inputs and the weight's gradient sums each firing input's output gradients (the C kernels, over the
    spikes only); the input's gradient, grad @ W, is dense (a surrogate gradient reaches every input).
    x [rows, in] spikes or counts; weight [out, in]."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return spike_matmul_rows_kernel(x, weight.detach().t().contiguous(), torch.get_num_threads())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_weight = spike_grad_weight_kernel(x, grad, torch.get_num_threads()).t() \
            if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight


def sparse_enough_for_training(flat) -> bool:
    """Whether a training matmul fed `flat` [rows, in] takes `SpikeMatmul`: the C kernels run on it, there are
    enough rows to pay for the count, and few enough inputs fire."""
    return flat.shape[0] >= TRAINING_MIN_ROWS and kernel_supports(flat) and \
        not torch.is_autocast_enabled("cpu") and \
        count_nonzero_kernel(flat) <= TRAINING_MAX_RATE * flat.numel()


class SpikeLinear(nn.Linear):
    """nn.Linear for a matrix fed spikes (or, `counts`, per-token spike counts): at inference with a small
    batch and sparse input, event-driven (the C kernel, else the compacted matmul; with `batch_invariant`, the
    C kernel or the gather-sum, whatever the batch and rate); otherwise the dense matmul. Same parameters and
    state dict as nn.Linear; the transposed copy of the weight is made on first use and remade when the weight
    changes (training, loading, `.to()`)."""

    def __init__(self, in_features, out_features, bias=False, counts=False, **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.counts = counts
        self.event_driven = True  # at inference, event-driven where it pays (set_event_driven)
        self.batch_invariant = False  # at inference, always a fixed-order row sum (set_batch_invariant)
        self._weight_t = None
        self._weight_key = None
        self.counter = None  # set by spikelm.energy while counting: called directly, cheaper than a hook

    def weight_t(self):
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._weight_key != key:
            with torch.no_grad():
                self._weight_t = w.detach().t().contiguous()
            self._weight_key = key
        return self._weight_t

    def forward(self, x):
        out = self._matmul(x)
        if self.counter is not None:
            self.counter.linear(self, (x,), out)
        return out

    def _matmul(self, x):
        invariant = self.batch_invariant
        if torch.is_grad_enabled() and self.event_driven and x.dim() >= 2 and not torch.compiler.is_compiling():
            flat = x.reshape(-1, x.shape[-1])
            if sparse_enough_for_training(flat):
                out = SpikeMatmul.apply(flat, self.weight)
                if self.bias is not None:
                    out = out + self.bias
                return out.view(*x.shape[:-1], self.out_features)
        if torch.is_grad_enabled() or not (self.event_driven or invariant) or x.dim() < 2 or \
                torch.compiler.is_compiling():  # a compiled step: static shapes, the dense matmul
            return super().forward(x)
        flat = x.reshape(-1, x.shape[-1])
        worth_it = flat.shape[0] <= EVENT_DRIVEN_MAX_ROWS and self.weight.numel() >= EVENT_DRIVEN_MIN_WEIGHTS
        if not (invariant or worth_it):
            return super().forward(x)
        if kernel_supports(flat):  # the C loop: one call, each active input's row read once, batch-invariant
            rows = flat.shape[0]
            rate = EVENT_DRIVEN_MAX_RATE_ONE_ROW if rows == 1 else \
                EVENT_DRIVEN_MAX_RATE_ONE_SEQUENCE if rows <= 8 else EVENT_DRIVEN_MAX_RATE
            out = spike_matmul_kernel(flat, self.weight_t(), None if invariant else int(rate * flat.numel()))
            if out is None:
                return super().forward(x)  # too many spikes: the dense matmul is faster
        elif invariant:
            rows, inputs = flat.nonzero(as_tuple=True)
            out = _gather_sum(flat, rows, inputs, self.weight_t(), self.counts)
        else:
            active = flat.any(0).nonzero().squeeze(1)
            if active.numel() > EVENT_DRIVEN_MAX_ACTIVE * self.in_features:
                return super().forward(x)  # too many active inputs: the dense matmul is faster
            out = _compacted(flat, active, self.weight_t())
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return super().extra_repr() + (", fed spike counts" if self.counts else ", fed spikes")


def crossover(shapes=CROSSOVER_SHAPES, active=(0.1, 0.3, 0.5, 0.7), batches=(1, 8), time_steps=4,
              fire_when_active=0.7, passes=3, pool_bytes=CROSSOVER_POOL_BYTES, dtype=torch.float32):
    """Dense against the event-driven forms (C kernel where available, compacted, gather-sum) for one decode
    step's spikes ([T * batch, in]), as a decode step meets them: each shape's matrix is copied until the copies
    fill `pool_bytes` (more than the cache) and every timing pass visits each copy once, so each call reads its
    weights from memory. Spikes: in each sequence a fraction `active` of the inputs may fire, each at each step
    with probability `fire_when_active`.
    -> rows of {in, out, batch, active, rate, dense_us, kernel_us (None without the kernel), compacted_us,
    gather_us} (best of `passes`), and per shape and batch the highest firing rate at which the kernel, and the
    highest active fraction at which the compacted form, beat dense (`spikelm bench` reports them; the
    EVENT_DRIVEN_MAX_ constants are set from such runs)."""
    generator = torch.Generator().manual_seed(0)
    with_kernel = kernel_supports(torch.empty(0, dtype=dtype))
    rows = []
    for d_in, d_out in shapes:
        copies = max(2, pool_bytes // (d_in * d_out * torch.finfo(dtype).bits // 8))
        weights = [torch.randn(d_out, d_in, generator=generator, dtype=dtype) for _ in range(copies)]
        weights_t = [w.t().contiguous() for w in weights]
        for batch in batches:
            for fraction in active:
                may_fire = (torch.rand(batch, 1, d_in, generator=generator) < fraction)
                fired = torch.rand(batch, time_steps, d_in, generator=generator) < fire_when_active
                spikes = (fired & may_fire).to(dtype).view(batch * time_steps, d_in)
                forms = {"dense": lambda k: F.linear(spikes, weights[k]),
                         "compacted": lambda k: compacted_matmul(spikes, weights_t[k]),
                         "gather": lambda k: event_driven_matmul(spikes, weights_t[k])}
                if with_kernel:
                    forms["kernel"] = lambda k: spike_matmul_kernel(spikes, weights_t[k])
                timings = {"kernel": None}
                for name, fn in forms.items():
                    best = float("inf")
                    for _ in range(passes + 1):  # the first pass warms up
                        start = time.perf_counter()
                        for k in range(copies):
                            fn(k)
                        best = min(best, (time.perf_counter() - start) / copies)
                    timings[name] = best * 1e6
                rows.append({"in": d_in, "out": d_out, "batch": batch, "active": float(spikes.any(0).float().mean()),
                             "rate": float(spikes.mean()), **{f"{name}_us": us for name, us in timings.items()}})
    kernel_faster, compacted_faster = {}, {}
    for row in rows:
        key = f"{row['in']}x{row['out']} batch {row['batch']}"
        if row["kernel_us"] is not None:
            kernel_faster[key] = max(kernel_faster.get(key, 0.0),
                                     row["rate"] if row["kernel_us"] < row["dense_us"] else 0.0)
        compacted_faster[key] = max(compacted_faster.get(key, 0.0),
                                    row["active"] if row["compacted_us"] < row["dense_us"] else 0.0)
    return {"rows": rows, "kernel_highest_rate_faster": kernel_faster,
            "compacted_highest_active_faster": compacted_faster}
