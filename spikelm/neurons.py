"""Spiking neurons over T time steps: leaky integrate-and-fire, with surrogate gradients.

One neuron step is charge, fire, reset (as in SpikingJelly and snnTorch):

    membrane = leak * membrane + current        # charge
    spikes   = Heaviside(membrane - threshold)  # fire: exactly 0 or 1
    membrane = membrane - threshold * spikes    # soft reset (by subtraction), or
    membrane = membrane * (1 - spikes)          # hard reset (to zero)

IF is LIF with leak 1. Heaviside has no useful derivative, so the backward pass
uses the derivative of a smooth primitive (arctan by default) in its place
(Neftci, Mostafa & Zenke 2019; the arctan form is Fang et al. 2021's).

The step is written once, `lif_step` (and its backward once, `lif_step_backward`); every path loops over it:
- `lif_reference`: the readable one, autograd through a surrogate `Function`;
- `LIFMultiStep`: all T steps in one autograd node with a backward through time, each step writing into
  preallocated buffers (less memory, fewer page faults);
- `LIFMultiStepCompiled` and `lif_inference`'s compiled kernel: the same loops under `torch.compile`, which
  fuses the T steps into one generated kernel;
- `lif_inference`: no autograd; on the CPU the C kernel of `spikelm.kernels` (the same step in a C loop: one call
  instead of 3T + 4), else one membrane buffer updated in place.
Tests check that they agree (tests/test_neurons.py).
"""

import math
import os
import warnings

import torch
from torch import nn

from .kernels import lif as lif_kernel
from .kernels import supports as kernel_supports

# ---------------------------------------------------------------- surrogates
# Each surrogate is a smooth primitive g (a soft step) and its derivative g'.
# x is membrane - threshold; alpha is the sharpness. The derivatives are written once, in place over x (the
# backward passes hand them a scratch buffer); `surrogate_derivative` is the out-of-place form.


def arctan_primitive(x, alpha):
    return torch.atan(math.pi / 2 * alpha * x) / math.pi + 0.5


def arctan_derivative_(x, alpha):  # alpha / 2 / (1 + (pi / 2 * alpha * x)^2)
    return x.mul_(math.pi / 2 * alpha).square_().add_(1).reciprocal_().mul_(alpha / 2)


def sigmoid_primitive(x, alpha):
    return torch.sigmoid(alpha * x)


def sigmoid_derivative_(x, alpha):  # alpha * sig * (1 - sig), sig = sigmoid(alpha * x)
    sig = x.mul_(alpha).sigmoid_()
    return sig.sub_(sig.square()).mul_(alpha)


def triangle_primitive(x, alpha):
    # integral of the triangle alpha * max(0, 1 - alpha |x|): a piecewise quadratic step
    y = (alpha * x).clamp(-1, 1)
    return torch.where(y < 0, 0.5 * (1 + y) ** 2, 1 - 0.5 * (1 - y) ** 2)


def triangle_derivative_(x, alpha):  # alpha * max(0, 1 - alpha |x|)
    return x.abs_().mul_(-alpha).add_(1).clamp_(min=0).mul_(alpha)


SURROGATE_PRIMITIVES = {"arctan": arctan_primitive, "sigmoid": sigmoid_primitive, "triangle": triangle_primitive}
SURROGATE_DERIVATIVES_ = {"arctan": arctan_derivative_, "sigmoid": sigmoid_derivative_,
                          "triangle": triangle_derivative_}


def surrogate_derivative(x, surrogate: str, alpha: float):
    """g'(x), a new tensor."""
    return SURROGATE_DERIVATIVES_[surrogate](x.clone(), alpha)


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
        return grad_spikes * surrogate_derivative(x, ctx.surrogate, ctx.alpha), None, None


def spike(x, surrogate: str = "arctan", alpha: float = 2.0):
    return SpikeFunction.apply(x, surrogate, alpha)


# ---------------------------------------------------------------- the step, written once


def heaviside(charged, threshold, out=None):
    """Fire: 1 where the charged membrane reaches the threshold, else 0 (no gradient)."""
    if out is not None:
        return torch.ge(charged, threshold, out=out)
    return torch.ge(charged, threshold).to(charged.dtype)


def surrogate_fire(surrogate, alpha):
    """Fire with a surrogate gradient (for autograd through the step)."""
    return lambda charged, threshold, out=None: spike(charged - threshold, surrogate, alpha)


def lif_reset(charged, spikes, threshold, soft: bool, out=None):
    """Soft reset v = h - theta * s, or hard reset v = h * (1 - s) (written h - h * s)."""
    if soft:
        return torch.sub(charged, spikes, alpha=threshold, out=out)
    return torch.addcmul(charged, charged, spikes, value=-1, out=out)


def lif_step(membrane, current, leak, threshold, soft=True, fire=heaviside, detach_reset=False, out=None):
    """One time step of a LIF population: (membrane, current) -> (spikes, new membrane, charged membrane).

    leak: a tensor (0-dim or broadcastable); fire: `heaviside` or `surrogate_fire(...)`; out: optional
    (charged, spikes, new membrane) buffers to write into (the in-place paths; may alias `membrane`).
    """
    charged_out, spikes_out, membrane_out = out or (None, None, None)
    charged = torch.addcmul(current, membrane, leak, out=charged_out)  # charge: h = x + leak * v
    spikes = fire(charged, threshold, out=spikes_out)  # fire: exactly 0 or 1
    membrane = lif_reset(charged, spikes.detach() if detach_reset else spikes, threshold, soft, out=membrane_out)
    return spikes, membrane, charged


def lif_step_backward(grad_spikes, grad_membrane, charged, spikes, threshold, soft, detach_reset, surrogate,
                      alpha, out=None):
    """dL/dh[t] of one step, from dL/ds[t] and dL/dv[t] (the gradient reaching the new membrane):
        dL/dh = dL/ds * g'(h - theta) + dL/dv * dv/dh
        soft: dv/dh = 1 - theta * g'    hard: dv/dh = (1 - s) - h * g'    (detached reset: 1, 1 - s)
    Then dL/dx[t] = dL/dh[t] and dL/dv[t-1] = leak * dL/dh[t]. out: optional (grad_h, slope, scratch) buffers.
    """
    grad_h, slope, scratch = out or (None, None, None)
    slope = SURROGATE_DERIVATIVES_[surrogate](torch.sub(charged, threshold, out=slope), alpha)
    grad_h = torch.mul(grad_spikes, slope, out=grad_h)  # through the spike, plus through the membrane:
    if soft:
        grad_h.add_(grad_membrane)
        if not detach_reset:
            grad_h.sub_(torch.mul(grad_membrane, slope, out=scratch), alpha=threshold)
    else:
        grad_h.add_(grad_membrane).addcmul_(grad_membrane, spikes, value=-1)
        if not detach_reset:
            grad_h.sub_(torch.mul(grad_membrane, slope, out=scratch).mul_(charged))
    return grad_h


def _as_leak(leak, like):
    return leak if torch.is_tensor(leak) else torch.tensor(float(leak), dtype=like.dtype, device=like.device)


# ---------------------------------------------------------------- reference path


def lif_reference(current, leak, threshold, reset="soft", surrogate="arctan", alpha=2.0, detach_reset=False,
                  initial_membrane=0.0):
    """Multi-step LIF by a Python loop over lif_step, autograd through it. current: [T, ...] -> spikes [T, ...]."""
    leak = _as_leak(leak, current)
    membrane = torch.full_like(current[0], initial_membrane)
    fire = surrogate_fire(surrogate, alpha)
    spikes = []
    for t in range(current.shape[0]):
        s, membrane, _ = lif_step(membrane, current[t], leak, threshold, reset == "soft", fire, detach_reset)
        spikes.append(s)
    return torch.stack(spikes)


# ---------------------------------------------------------------- fast path


class LIFMultiStep(torch.autograd.Function):
    """All T steps in one node. Saves only the charged membranes h[t] and the spikes; backward runs back
    through time (lif_step_backward). Every step writes into preallocated buffers (`out=`, in-place ops): on
    the CPU, a fresh large temporary per operation costs more in page faults than the arithmetic itself.
    With a learned leak: dL/dleak = sum_t dL/dh[t] * v[t-1].
    """

    @staticmethod
    def forward(ctx, current, leak, threshold, reset, surrogate, alpha, detach_reset, initial_membrane):
        membrane = torch.full_like(current[0], initial_membrane)
        charged = torch.empty_like(current)  # h[t], kept for the backward pass
        spikes = torch.empty_like(current)
        soft = reset == "soft"
        for t in range(current.shape[0]):
            lif_step(membrane, current[t], leak, threshold, soft, out=(charged[t], spikes[t], membrane))
        ctx.save_for_backward(charged, spikes, leak)
        ctx.settings = (threshold, soft, surrogate, alpha, detach_reset, initial_membrane)
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes):
        charged, spikes, leak = ctx.saved_tensors
        threshold, soft, surrogate, alpha, detach_reset, initial_membrane = ctx.settings
        grad_spikes = grad_spikes.contiguous()
        grad_current = torch.empty_like(charged)
        grad_membrane = torch.zeros_like(charged[0])  # dL/dv[t], flowing back from step t+1
        slope, scratch = torch.empty_like(charged[0]), torch.empty_like(charged[0])
        grad_leak = torch.zeros((), dtype=charged.dtype, device=charged.device) if leak.requires_grad else None
        for t in reversed(range(charged.shape[0])):
            grad_h = lif_step_backward(grad_spikes[t], grad_membrane, charged[t], spikes[t], threshold, soft,
                                       detach_reset, surrogate, alpha, out=(grad_current[t], slope, scratch))
            if grad_leak is not None:
                if t > 0:  # v[t-1] = reset(h[t-1], s[t-1])
                    previous = lif_reset(charged[t - 1], spikes[t - 1], threshold, soft, out=scratch)
                    grad_leak = grad_leak + (grad_h * previous).sum()
                elif initial_membrane != 0.0:
                    grad_leak = grad_leak + grad_h.sum() * initial_membrane
            torch.mul(grad_h, leak, out=grad_membrane)
        return grad_current, grad_leak, None, None, None, None, None, None


def lif_multistep(current, leak, threshold, reset="soft", surrogate="arctan", alpha=2.0, detach_reset=False,
                  initial_membrane=0.0):
    """Multi-step LIF, fast path. current: [T, ...] -> spikes [T, ...], each exactly 0 or 1."""
    leak = _as_leak(leak, current)
    eager = lambda: LIFMultiStep.apply(current, leak, threshold, reset, surrogate, alpha, detach_reset,  # noqa: E731
                                       initial_membrane)
    if _use_compiled(current) and not leak.requires_grad:
        return _with_fallback(lambda: LIFMultiStepCompiled.apply(current, leak, threshold, reset, surrogate, alpha,
                                                                 detach_reset, initial_membrane), eager)
    return eager()


def lif_inference(current, leak, threshold, reset="soft", initial_membrane=0.0, count_rows=False):
    """Multi-step LIF without autograd: the same spikes as lif_multistep (tests/test_neurons.py). On the CPU,
    the C kernel (spikelm.kernels: the T steps in one call of a few microseconds); compiled: the T steps in one
    generated kernel (large populations); eager: one membrane buffer updated in place. leak: a number or a
    0-dim tensor. count_rows: return (spikes, spikes of each batch row as a list, or None where only the C
    kernel could count them as they fire)."""
    if not _use_compiled(current) and kernel_supports(current):
        return lif_kernel(current, leak if isinstance(leak, float) else float(leak), threshold, reset == "soft",
                          initial_membrane, count_rows)
    if count_rows:
        return lif_inference(current, leak, threshold, reset, initial_membrane), None
    leak = _as_leak(leak, current)

    def eager():  # few dispatches: a decode step runs ~30 populations of T steps, each op a few microseconds
        membrane = torch.full(current.shape[1:], initial_membrane, dtype=current.dtype, device=current.device)
        spikes = torch.empty_like(current)
        soft = reset == "soft"
        for current_t, spikes_t in zip(current.unbind(0), spikes.unbind(0)):
            lif_step(membrane, current_t, leak, threshold, soft, out=(membrane, spikes_t, membrane))
        return spikes

    if _use_compiled(current):
        return _with_fallback(lambda: _kernel("inference")(current, leak, float(threshold), reset == "soft",
                                                           float(initial_membrane)), eager)
    return eager()


# ---------------------------------------------------------------- compiled path
# The eager fast path makes ~14 passes over memory per step; torch.compile fuses each direction into one
# generated loop (C++ on the CPU, Triton on GPUs). It costs a compilation (tens of seconds on 2 cores, cached on
# disk afterwards) and ~0.1 ms per call on a busy CPU, so by default it is used where it pays: populations of
# at least COMPILED_MIN_ELEMENTS numbers (T x batch x tokens x width; one thread here, fwd+bwd of [4, N, 1024]:
# even at 1M numbers, 4x faster at 4M), that is training steps and long prefills, never a decode step. Where
# compilation fails (no C++ compiler, an unsupported platform) the eager path takes over, with one warning.
# `enable_compiled_kernels(True/False)` or SPIKELM_COMPILE_NEURONS=1/0 force it on or off for every size.

COMPILED_MIN_ELEMENTS = 2 ** 21
_compiled_kernels_enabled = {"1": True, "0": False}.get(os.environ.get("SPIKELM_COMPILE_NEURONS", ""))  # None: auto
_compiled = {}
_compile_failed = False


def enable_compiled_kernels(enabled: bool | None = True):
    """True: compiled kernels at every size; False: never; None: where they pay (the default)."""
    global _compiled_kernels_enabled
    _compiled_kernels_enabled = enabled


def _use_compiled(current):
    if _compile_failed or _compiled_kernels_enabled is False:
        return False
    return _compiled_kernels_enabled or current.numel() >= COMPILED_MIN_ELEMENTS


def _with_fallback(compiled, eager):
    """Run the compiled kernel; if compilation is unavailable here, warn once and use the eager path for good."""
    global _compile_failed
    try:
        return compiled()
    except Exception as error:  # torch._dynamo / inductor errors: no compiler, unsupported backend
        if _compiled_kernels_enabled:
            raise  # asked for explicitly: say why it cannot be had
        warnings.warn(f"spikelm: compiled neuron kernels unavailable ({type(error).__name__}: {error}); "
                      "using the eager path")
        _compile_failed = True
        return eager()


def _lif_forward_kernel(current, leak, threshold: float, soft: bool, initial_membrane: float):
    membrane = torch.full_like(current[0], initial_membrane)
    charged, spikes = [], []
    for t in range(current.shape[0]):
        s, membrane, h = lif_step(membrane, current[t], leak, threshold, soft)
        charged.append(h)
        spikes.append(s)
    return torch.stack(spikes), torch.stack(charged)


def _lif_inference_kernel(current, leak, threshold: float, soft: bool, initial_membrane: float):
    membrane = torch.full_like(current[0], initial_membrane)
    spikes = []
    for t in range(current.shape[0]):
        s, membrane, _ = lif_step(membrane, current[t], leak, threshold, soft)
        spikes.append(s)
    return torch.stack(spikes)


def _lif_backward_kernel(grad_spikes, charged, spikes, leak, threshold: float, soft: bool, detach_reset: bool,
                         surrogate: str, alpha: float):
    grad_membrane = torch.zeros_like(charged[0])
    grads = []
    for t in range(charged.shape[0] - 1, -1, -1):
        grad_h = lif_step_backward(grad_spikes[t], grad_membrane, charged[t], spikes[t], threshold, soft,
                                   detach_reset, surrogate, alpha)
        grads.append(grad_h)
        grad_membrane = leak * grad_h
    return torch.stack(grads[::-1])


_KERNELS = {"forward": _lif_forward_kernel, "backward": _lif_backward_kernel, "inference": _lif_inference_kernel}


def _kernel(name):
    if name not in _compiled:
        _compiled[name] = torch.compile(_KERNELS[name], dynamic=True)
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
        self._fixed_leak_tensor = None  # (dtype and device, the leak as a 0-dim tensor there)
        self.counter = None  # set by spikelm.energy while counting

    def forward(self, current):
        if current.shape[0] != self.time_steps:
            raise ValueError(f"SpikingNeuron expects input of shape [T={self.time_steps}, ...] (time first), "
                             f"got {tuple(current.shape)}")
        if self.leak_logit is not None:
            leak = torch.sigmoid(self.leak_logit).to(current.dtype)
        elif not torch.is_grad_enabled():  # inference: the number itself (the C kernel takes it as it is)
            leak = self.fixed_leak
        else:  # made once per dtype and device
            key = (current.dtype, current.device)
            if self._fixed_leak_tensor is None or self._fixed_leak_tensor[0] != key:
                self._fixed_leak_tensor = (key, torch.tensor(self.fixed_leak, dtype=current.dtype,
                                                             device=current.device))
            leak = self._fixed_leak_tensor[1]
        if torch.is_grad_enabled() and (current.requires_grad or leak.requires_grad):
            spikes = lif_multistep(current, leak, self.threshold, self.reset, self.surrogate, self.alpha,
                                   self.detach_reset, self.initial_membrane)
        elif self.counter is not None:  # inference, counted: the C kernel counts each row's spikes as they fire
            spikes, row_spikes = lif_inference(current, leak, self.threshold, self.reset, self.initial_membrane,
                                               count_rows=True)
            self.counter.fired(self, spikes, row_spikes)
            return spikes
        else:  # inference (generation, evaluation): nothing to keep for a backward pass
            spikes = lif_inference(current, leak, self.threshold, self.reset, self.initial_membrane)
        if self.counter is not None:
            self.counter.fired(self, spikes)
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
