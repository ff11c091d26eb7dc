"""Spiking neurons over T time steps: leaky integrate-and-fire, with surrogate gradients.

One neuron step is charge, fire, reset (as in SpikingJelly and snnTorch):

    membrane = leak * membrane + current        # charge
    spikes   = Heaviside(membrane - threshold)  # fire: exactly 0 or 1
    membrane = membrane - threshold * spikes    # soft reset (by subtraction), or
    membrane = membrane * (1 - spikes)          # hard reset (to zero)

IF is LIF with leak 1. Heaviside has no useful derivative, so the backward pass
uses the derivative of a smooth primitive (arctan by default) in its place
(Neftci, Mostafa & Zenke 2019; the arctan form is Fang et al. 2021's).

Two paths compute the same numbers: `lif_step` (a pure function, autograd
through a surrogate `Function`), readable, and `LIFMultiStep`, which runs all
T steps in one autograd node with a hand-written backward through time (less
memory, fewer kernel launches). A test checks that they agree.
"""

import math
import os

import torch
from torch import nn

# ---------------------------------------------------------------- surrogates
# Each surrogate is a smooth primitive g (a soft step) and its derivative g'.
# x is membrane - threshold; alpha is the sharpness.


def arctan_primitive(x, alpha):
    return torch.atan(math.pi / 2 * alpha * x) / math.pi + 0.5


def arctan_derivative(x, alpha):
    return alpha / 2 / (1 + (math.pi / 2 * alpha * x) ** 2)


def sigmoid_primitive(x, alpha):
    return torch.sigmoid(alpha * x)


def sigmoid_derivative(x, alpha):
    sig = torch.sigmoid(alpha * x)
    return alpha * sig * (1 - sig)


def triangle_primitive(x, alpha):
    # integral of the triangle alpha * max(0, 1 - alpha |x|): a piecewise quadratic step
    y = (alpha * x).clamp(-1, 1)
    return torch.where(y < 0, 0.5 * (1 + y) ** 2, 1 - 0.5 * (1 - y) ** 2)


def triangle_derivative(x, alpha):
    return alpha * (1 - alpha * x.abs()).clamp(min=0)


SURROGATE_PRIMITIVES = {"arctan": arctan_primitive, "sigmoid": sigmoid_primitive, "triangle": triangle_primitive}
SURROGATE_DERIVATIVES = {"arctan": arctan_derivative, "sigmoid": sigmoid_derivative, "triangle": triangle_derivative}


class SpikeFunction(torch.autograd.Function):
    """Heaviside forward (spikes exactly 0 or 1), surrogate derivative backward."""

    @staticmethod
    def forward(ctx, x, surrogate: str, alpha: float):
        ctx.save_for_backward(x)
        ctx.surrogate, ctx.alpha = surrogate, alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_spikes):
        (x,) = ctx.saved_tensors
        return grad_spikes * SURROGATE_DERIVATIVES[ctx.surrogate](x, ctx.alpha), None, None


def spike(x, surrogate: str = "arctan", alpha: float = 2.0):
    return SpikeFunction.apply(x, surrogate, alpha)


# ---------------------------------------------------------------- reference path


def lif_step(membrane, current, leak, threshold, reset="soft", surrogate="arctan", alpha=2.0, detach_reset=False):
    """One time step: (membrane, current) -> (spikes, new membrane). Pure; autograd does the backward."""
    membrane = leak * membrane + current
    spikes = spike(membrane - threshold, surrogate, alpha)
    reset_spikes = spikes.detach() if detach_reset else spikes
    if reset == "soft":
        membrane = membrane - threshold * reset_spikes
    else:
        membrane = membrane * (1 - reset_spikes)
    return spikes, membrane


def lif_reference(current, leak, threshold, reset="soft", surrogate="arctan", alpha=2.0, detach_reset=False,
                  initial_membrane=0.0):
    """Multi-step LIF by a Python loop over lif_step. current: [T, ...] -> spikes [T, ...]."""
    membrane = torch.full_like(current[0], initial_membrane)
    spikes = []
    for t in range(current.shape[0]):
        s, membrane = lif_step(membrane, current[t], leak, threshold, reset, surrogate, alpha, detach_reset)
        spikes.append(s)
    return torch.stack(spikes)


# ---------------------------------------------------------------- fast path


def surrogate_derivative_(x, surrogate: str, alpha: float):
    """g'(x) computed in place over x (the fast path's copy of the *_derivative functions above)."""
    if surrogate == "arctan":  # alpha / 2 / (1 + (pi / 2 * alpha * x)^2)
        return x.mul_(math.pi / 2 * alpha).square_().add_(1).reciprocal_().mul_(alpha / 2)
    if surrogate == "sigmoid":  # alpha * sig * (1 - sig), sig = sigmoid(alpha * x)
        sig = x.mul_(alpha).sigmoid_()
        return sig.sub_(sig.square()).mul_(alpha)
    # triangle: alpha * max(0, 1 - alpha |x|)
    return x.abs_().mul_(-alpha).add_(1).clamp_(min=0).mul_(alpha)


class LIFMultiStep(torch.autograd.Function):
    """All T steps in one node. Saves only the charged membranes h[t] and the spikes; backward runs back
    through time. Every step writes into preallocated buffers (`out=`, in-place ops): on the CPU, a fresh
    large temporary per operation costs more in page faults than the arithmetic itself.

    Backward, with h[t] = leak * v[t-1] + x[t], s[t] = H(h[t] - theta), v[t] = reset(h[t], s[t]):
        dL/dh[t]   = dL/ds[t] * g'(h[t] - theta) + dL/dv[t] * dv[t]/dh[t]
                     soft: dv/dh = 1 - theta * g'    hard: dv/dh = (1 - s) - h * g'    (detached: 1, 1 - s)
        dL/dx[t]   = dL/dh[t]
        dL/dv[t-1] = leak * dL/dh[t]
        dL/dleak  += dL/dh[t] * v[t-1]
    """

    @staticmethod
    def forward(ctx, current, leak, threshold, reset, surrogate, alpha, detach_reset, initial_membrane):
        membrane = torch.full_like(current[0], initial_membrane)
        charged = torch.empty_like(current)  # h[t], kept for the backward pass
        spikes = torch.empty_like(current)
        for t in range(current.shape[0]):
            h, s = charged[t], spikes[t]
            torch.addcmul(current[t], membrane, leak, out=h)  # charge: h = x + leak * v
            torch.ge(h, threshold, out=s)  # fire: exactly 0 or 1
            if reset == "soft":
                torch.sub(h, s, alpha=threshold, out=membrane)  # v = h - theta * s
            else:
                torch.addcmul(h, h, s, value=-1, out=membrane)  # v = h * (1 - s)
        ctx.save_for_backward(charged, spikes, leak)
        ctx.settings = (threshold, reset, surrogate, alpha, detach_reset, initial_membrane)
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes):
        charged, spikes, leak = ctx.saved_tensors
        threshold, reset, surrogate, alpha, detach_reset, initial_membrane = ctx.settings
        grad_spikes = grad_spikes.contiguous()
        grad_current = torch.empty_like(charged)
        grad_membrane = torch.zeros_like(charged[0])  # dL/dv[t], flowing back from step t+1
        slope = torch.empty_like(charged[0])  # g'(h[t] - theta)
        scratch = torch.empty_like(charged[0])
        grad_leak = torch.zeros((), dtype=charged.dtype, device=charged.device) if leak.requires_grad else None
        for t in reversed(range(charged.shape[0])):
            h, s, grad_h = charged[t], spikes[t], grad_current[t]
            surrogate_derivative_(torch.sub(h, threshold, out=slope), surrogate, alpha)
            torch.mul(grad_spikes[t], slope, out=grad_h)  # through the spike
            # ... plus through the membrane: grad_v * dv/dh
            if reset == "soft":
                grad_h.add_(grad_membrane)
                if not detach_reset:
                    grad_h.sub_(torch.mul(grad_membrane, slope, out=scratch), alpha=threshold)
            else:
                grad_h.add_(grad_membrane).addcmul_(grad_membrane, s, value=-1)
                if not detach_reset:
                    grad_h.sub_(torch.mul(grad_membrane, slope, out=scratch).mul_(h))
            if grad_leak is not None:
                if t > 0:  # v[t-1] = reset(h[t-1], s[t-1])
                    hp, sp = charged[t - 1], spikes[t - 1]
                    if reset == "soft":
                        previous = torch.sub(hp, sp, alpha=threshold, out=scratch)
                    else:
                        previous = torch.addcmul(hp, hp, sp, value=-1, out=scratch)
                    grad_leak = grad_leak + (grad_h * previous).sum()
                elif initial_membrane != 0.0:
                    grad_leak = grad_leak + grad_h.sum() * initial_membrane
            torch.mul(grad_h, leak, out=grad_membrane)
        return grad_current, grad_leak, None, None, None, None, None, None


def lif_multistep(current, leak, threshold, reset="soft", surrogate="arctan", alpha=2.0, detach_reset=False,
                  initial_membrane=0.0):
    """Multi-step LIF, fast path. current: [T, ...] -> spikes [T, ...], each exactly 0 or 1."""
    if not torch.is_tensor(leak):
        leak = torch.tensor(float(leak), dtype=current.dtype, device=current.device)
    if _compiled_kernels_enabled and not leak.requires_grad:
        return LIFMultiStepCompiled.apply(current, leak, threshold, reset, surrogate, alpha, detach_reset,
                                          initial_membrane)
    return LIFMultiStep.apply(current, leak, threshold, reset, surrogate, alpha, detach_reset, initial_membrane)


def lif_inference(current, leak, threshold, reset="soft", initial_membrane=0.0):
    """Multi-step LIF without autograd: one membrane buffer, updated in place; the same spikes as
    lif_multistep (tests/test_neurons.py). Decoding calls it once per neuron population and token."""
    membrane = torch.full_like(current[0], initial_membrane)
    spikes = torch.empty_like(current)
    for t in range(current.shape[0]):
        torch.addcmul(current[t], membrane, leak, out=membrane)  # charge
        torch.ge(membrane, threshold, out=spikes[t])  # fire
        if reset == "soft":
            membrane.sub_(spikes[t], alpha=threshold)
        else:
            membrane.addcmul_(membrane, spikes[t], value=-1)
    return spikes


# ---------------------------------------------------------------- compiled path (opt-in)
# The eager fast path makes ~14 passes over memory per step; torch.compile fuses each direction into one
# generated loop (C++ on the CPU, Triton on GPUs), about 10x faster on a 4x2048x1024 tensor here. It costs a
# compilation (tens of seconds on 2 cores, cached on disk afterwards), so it is opt-in: `spikelm train
# --compile-neurons`, `spikelm.neurons.enable_compiled_kernels()`, or SPIKELM_COMPILE_NEURONS=1.

_compiled_kernels_enabled = os.environ.get("SPIKELM_COMPILE_NEURONS", "0") == "1"
_compiled = {}


def enable_compiled_kernels(enabled: bool = True):
    global _compiled_kernels_enabled
    _compiled_kernels_enabled = enabled


def _lif_forward_kernel(current, leak, threshold: float, soft: bool, initial_membrane: float):
    membrane = torch.full_like(current[0], initial_membrane)
    charged, spikes = [], []
    for t in range(current.shape[0]):
        h = current[t] + leak * membrane
        s = (h >= threshold).to(current.dtype)
        membrane = h - threshold * s if soft else h * (1 - s)
        charged.append(h)
        spikes.append(s)
    return torch.stack(spikes), torch.stack(charged)


def _lif_backward_kernel(grad_spikes, charged, spikes, leak, threshold: float, soft: bool, detach_reset: bool,
                         surrogate: str, alpha: float):
    derivative = SURROGATE_DERIVATIVES[surrogate]
    grad_membrane = torch.zeros_like(charged[0])
    grads = []
    for t in range(charged.shape[0] - 1, -1, -1):
        h, s = charged[t], spikes[t]
        slope = derivative(h - threshold, alpha)
        if soft:
            dv_dh = 1.0 if detach_reset else 1 - threshold * slope
        else:
            dv_dh = (1 - s) if detach_reset else (1 - s) - h * slope
        grad_h = grad_spikes[t] * slope + grad_membrane * dv_dh
        grads.append(grad_h)
        grad_membrane = leak * grad_h
    return torch.stack(grads[::-1])


def _kernel(name):
    if name not in _compiled:
        function = _lif_forward_kernel if name == "forward" else _lif_backward_kernel
        _compiled[name] = torch.compile(function, dynamic=True)
    return _compiled[name]


class LIFMultiStepCompiled(torch.autograd.Function):
    """LIFMultiStep with compiled kernels; the same numbers (tests/test_neurons.py). Fixed leak only."""

    @staticmethod
    def forward(ctx, current, leak, threshold, reset, surrogate, alpha, detach_reset, initial_membrane):
        spikes, charged = _kernel("forward")(current, leak, float(threshold), reset == "soft",
                                             float(initial_membrane))
        ctx.save_for_backward(charged, spikes, leak)
        ctx.settings = (float(threshold), reset == "soft", detach_reset, surrogate, float(alpha))
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes):
        charged, spikes, leak = ctx.saved_tensors
        grad_current = _kernel("backward")(grad_spikes.contiguous(), charged, spikes, leak, *ctx.settings)
        return grad_current, None, None, None, None, None, None, None


# A learned leak is sigmoid(logit); a leak of 1 (IF) has no finite logit, so it starts here (sigmoid(8) ~ 0.9997).
LEAK_LOGIT_OF_ONE = 8.0


def leak_logit(leak: float) -> float:
    """The logit a learned leak starts from."""
    return math.log(leak / (1 - leak)) if leak < 1 else LEAK_LOGIT_OF_ONE


class SpikingNeuron(nn.Module):
    """A population of LIF (or IF) neurons over the T steps of each token. Input and output are [T, ...].

    The membrane starts at rest (`initial_membrane`, 0 by default; converted ANN models start at half the
    threshold) for every token: tokens meet only through attention, so all positions run in parallel.
    Carries an optional spike counter for the energy report (off by default).
    """

    def __init__(self, config, time_steps=None):
        super().__init__()
        self.time_steps = time_steps or config.time_steps
        self.threshold = float(config.threshold)
        self.reset = config.reset
        self.surrogate = config.surrogate
        self.alpha = float(config.surrogate_alpha)
        self.detach_reset = config.detach_reset
        self.initial_membrane = float(config.initial_membrane)
        leak = config.leak_value
        if config.learn_leak and config.neuron_type == "lif":
            # leak = sigmoid(w) keeps it in (0, 1)
            self.leak_logit = nn.Parameter(torch.tensor(leak_logit(leak)))
        else:
            self.leak_logit = None
            self.fixed_leak = float(leak)  # a plain number: nothing to save, nothing for the loader to miss
        self.counter = None  # set by spikelm.energy while counting

    def forward(self, current):
        if current.shape[0] != self.time_steps:
            raise ValueError(f"SpikingNeuron expects input of shape [T={self.time_steps}, ...] (time first), "
                             f"got {tuple(current.shape)}")
        if self.leak_logit is not None:
            leak = torch.sigmoid(self.leak_logit).to(current.dtype)
        else:
            leak = torch.tensor(self.fixed_leak, dtype=current.dtype, device=current.device)
        if torch.is_grad_enabled() and (current.requires_grad or leak.requires_grad):
            spikes = lif_multistep(current, leak, self.threshold, self.reset, self.surrogate, self.alpha,
                                   self.detach_reset, self.initial_membrane)
        else:  # inference (generation, evaluation): nothing to keep for a backward pass
            spikes = lif_inference(current, leak, self.threshold, self.reset, self.initial_membrane)
        if self.counter is not None:
            self.counter(self, spikes)
        return spikes

    def extra_repr(self):
        return f"T={self.time_steps}, threshold={self.threshold}, reset={self.reset}, surrogate={self.surrogate}"


# ---------------------------------------------------------------- the ANN twin's activation


def floor_straight_through(x):
    """floor in the forward pass, identity in the backward pass (a straight-through estimator)."""
    return x + (torch.floor(x) - x).detach()


def qcfs(x, clip, levels: int):
    """Clip-floor-shift quantised activation with `levels` levels (Bu et al., ICLR 2022):
        h(x) = clip / L * clamp(floor(x * L / clip + 1/2), 0, L)
    For a constant input, it is what an IF neuron with threshold `clip`, soft reset and membrane starting at
    clip / 2 emits over L steps (spike count * clip / L), which makes the conversion to spikes exact layer by
    layer for constant inputs. Gradients reach x (inside the clip) and the learnable clip."""
    steps = torch.clamp(floor_straight_through(x * levels / clip + 0.5), 0, levels)
    return steps * clip / levels


class QCFSActivation(nn.Module):
    """The ANN twin's stand-in for a spiking neuron population: a QCFS activation with a learnable clip (which
    becomes the threshold on conversion). Input and output are [1, ...] (the twin runs with time_steps=1)."""

    def __init__(self, config):
        super().__init__()
        self.levels = int(config.quantization_levels)
        self.clip = nn.Parameter(torch.tensor(float(config.threshold)))

    @property
    def threshold(self):
        """The clip in use (kept positive): on conversion, the IF neuron's threshold."""
        return self.clip.abs().clamp(min=1e-3)

    def forward(self, x):
        return qcfs(x, self.threshold, self.levels)

    def extra_repr(self):
        return f"levels={self.levels}"
