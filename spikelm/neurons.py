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


class LIFMultiStep(torch.autograd.Function):
    """All T steps in one node. Saves only the charged membranes h[t]; backward runs back through time.

    Backward, with h[t] = leak * v[t-1] + x[t], s[t] = H(h[t] - theta), v[t] = reset(h[t], s[t]):
        dL/dh[t]   = dL/ds[t] * g'(h[t] - theta) + dL/dv[t] * dv[t]/dh[t]
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
            membrane = leak * membrane + current[t]
            charged[t] = membrane
            s = (membrane >= threshold).to(current.dtype)
            spikes[t] = s
            membrane = membrane - threshold * s if reset == "soft" else membrane * (1 - s)
        ctx.save_for_backward(charged, spikes, leak)
        ctx.settings = (threshold, reset, surrogate, alpha, detach_reset, initial_membrane)
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes):
        charged, spikes, leak = ctx.saved_tensors
        threshold, reset, surrogate, alpha, detach_reset, initial_membrane = ctx.settings
        derivative = SURROGATE_DERIVATIVES[surrogate]
        grad_current = torch.empty_like(charged)
        grad_membrane = torch.zeros_like(charged[0])  # dL/dv[t], flowing back from step t+1
        grad_leak = torch.zeros((), dtype=charged.dtype, device=charged.device) if leak.requires_grad else None
        for t in reversed(range(charged.shape[0])):
            h, s = charged[t], spikes[t]
            surrogate_grad = derivative(h - threshold, alpha)
            if reset == "soft":
                dv_dh = 1.0 if detach_reset else 1 - threshold * surrogate_grad
            else:
                dv_dh = (1 - s) if detach_reset else (1 - s) - h * surrogate_grad
            grad_h = grad_spikes[t] * surrogate_grad + grad_membrane * dv_dh
            grad_current[t] = grad_h
            grad_membrane = leak * grad_h
            if grad_leak is not None:
                if t > 0:
                    hp, sp = charged[t - 1], spikes[t - 1]
                    previous = hp - threshold * sp if reset == "soft" else hp * (1 - sp)
                    grad_leak = grad_leak + (grad_h * previous).sum()
                elif initial_membrane != 0.0:
                    grad_leak = grad_leak + grad_h.sum() * initial_membrane
        return grad_current, grad_leak, None, None, None, None, None, None


def lif_multistep(current, leak, threshold, reset="soft", surrogate="arctan", alpha=2.0, detach_reset=False,
                  initial_membrane=0.0):
    """Multi-step LIF, fast path. current: [T, ...] -> spikes [T, ...], each exactly 0 or 1."""
    if not torch.is_tensor(leak):
        leak = torch.tensor(float(leak), dtype=current.dtype, device=current.device)
    return LIFMultiStep.apply(current, leak, threshold, reset, surrogate, alpha, detach_reset, initial_membrane)


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
            self.leak_logit = nn.Parameter(torch.tensor(math.log(leak / (1 - leak)) if leak < 1 else 8.0))
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
        spikes = lif_multistep(current, leak, self.threshold, self.reset, self.surrogate, self.alpha,
                               self.detach_reset, self.initial_membrane)
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
