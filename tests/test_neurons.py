import pytest
import torch

from spikelm.neurons import (SURROGATE_PRIMITIVES, SpikingNeuron, lif_multistep, lif_reference, spike)
from conftest import tiny_config


@pytest.mark.parametrize("name", ["arctan", "sigmoid", "triangle"])
@pytest.mark.parametrize("alpha", [0.5, 2.0, 4.0])
def test_surrogate_backward_is_derivative_of_its_primitive(name, alpha):
    x = torch.linspace(-3, 3, 601, dtype=torch.float64)
    x = x[(x.abs() - 1 / alpha).abs() > 1e-6]  # the triangle's kinks have no derivative
    a = x.clone().requires_grad_(True)
    spike(a, name, alpha).sum().backward()
    b = x.clone().requires_grad_(True)
    SURROGATE_PRIMITIVES[name](b, alpha).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-12)
    assert a.grad.abs().sum() > 0


def test_forward_spikes_are_exactly_binary():
    out = spike(torch.randn(1000))
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert out.sum() > 0


def test_soft_reset_spike_train_by_hand():
    # leak 0.5, threshold 1, constant current 0.6:
    # v: 0.6 -> 0.9 -> 1.05 (spike, v=0.05) -> 0.625 -> 0.9125 -> 1.05625 (spike, v=0.05625)
    current = torch.full((6, 1), 0.6, dtype=torch.float64)
    spikes = lif_multistep(current, 0.5, 1.0, reset="soft")
    assert spikes.flatten().tolist() == [0, 0, 1, 0, 0, 1]
    # IF (leak 1) with soft reset, current 0.75 (exact in binary): 0.75, 1.5 (spike, 0.5), 1.25 (spike, 0.25),
    # 1.0 (spike, 0), 0.75, 1.5 (spike)
    current = torch.full((6, 1), 0.75, dtype=torch.float64)
    assert lif_multistep(current, 1.0, 1.0, reset="soft").flatten().tolist() == [0, 1, 1, 1, 0, 1]


def test_hard_reset_spike_train_by_hand():
    # leak 0.5, threshold 1, current 0.6: 0.6, 0.9, 1.05 (spike, v=0), 0.6, 0.9, 1.05 (spike)
    current = torch.full((6, 1), 0.6, dtype=torch.float64)
    assert lif_multistep(current, 0.5, 1.0, reset="hard").flatten().tolist() == [0, 0, 1, 0, 0, 1]
    # input 2.5 then 0.4 twice, IF: hard: 2.5 (spike, 0), 0.4, 0.8 -> [1, 0, 0]; soft: 2.5 (spike, 1.5),
    # 1.9 (spike, 0.9), 1.3 (spike) -> [1, 1, 1]
    current = torch.tensor([[2.5], [0.4], [0.4]], dtype=torch.float64)
    assert lif_multistep(current, 1.0, 1.0, reset="hard").flatten().tolist() == [1, 0, 0]
    assert lif_multistep(current, 1.0, 1.0, reset="soft").flatten().tolist() == [1, 1, 1]


@pytest.mark.parametrize("reset", ["soft", "hard"])
@pytest.mark.parametrize("surrogate", ["arctan", "sigmoid", "triangle"])
@pytest.mark.parametrize("detach_reset", [False, True])
def test_fast_path_equals_reference_forward_and_backward(reset, surrogate, detach_reset):
    current = torch.randn(4, 3, 17, dtype=torch.float64) * 1.5
    grad = torch.randn_like(current)
    results = []
    for fn in (lif_reference, lif_multistep):
        x = current.clone().requires_grad_(True)
        leak = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        spikes = fn(x, leak, 1.0, reset, surrogate, 2.0, detach_reset)
        (spikes * grad).sum().backward()
        results.append((spikes, x.grad, leak.grad))
    (s1, gx1, gl1), (s2, gx2, gl2) = results
    assert torch.equal(s1, s2)
    assert torch.allclose(gx1, gx2, atol=1e-10)
    assert torch.allclose(gl1, gl2, atol=1e-10)


def test_neuron_module_learns_its_leak_and_checks_shape():
    neuron = SpikingNeuron(tiny_config(learn_leak=True, time_steps=4))
    x = torch.randn(4, 2, 8, requires_grad=True)
    neuron(x * 3).sum().backward()
    assert neuron.leak_logit.grad is not None and neuron.leak_logit.grad.abs() > 0
    with pytest.raises(ValueError, match=r"\[T=4, \.\.\.\]"):
        neuron(torch.randn(3, 2, 8))


def test_compiled_kernels_equal_the_eager_path():
    from spikelm import neurons

    current = torch.randn(4, 3, 257) * 1.5
    grad = torch.randn_like(current)
    results = []
    for compiled in (False, True):
        neurons.enable_compiled_kernels(compiled)
        try:
            for reset in ("soft", "hard"):
                x = current.clone().requires_grad_(True)
                spikes = lif_multistep(x, 0.6, 1.0, reset, "arctan", 2.0)
                (spikes * grad).sum().backward()
                with torch.no_grad():
                    inferred = neurons.lif_inference(current, 0.6, 1.0, reset)
                results.append((spikes, x.grad, inferred))
        finally:
            neurons.enable_compiled_kernels(None)
    assert set(neurons._compiled) >= {"forward", "backward", "inference"}  # the compiled kernels did run
    for (s1, g1, i1), (s2, g2, i2) in zip(results[:2], results[2:]):
        assert torch.equal(s1, s2)
        assert torch.allclose(g1, g2, atol=1e-5)
        assert torch.equal(i1, s1) and torch.equal(i2, s1)


@pytest.mark.parametrize("reset", ["soft", "hard"])
def test_inference_path_equals_training_path(reset):
    from spikelm.neurons import lif_inference

    current = torch.randn(4, 5, 300, dtype=torch.float64) * 1.5
    leak = torch.tensor(0.6, dtype=torch.float64)
    expected = lif_multistep(current, leak, 1.0, reset, initial_membrane=0.5)
    assert torch.equal(lif_inference(current, leak, 1.0, reset, initial_membrane=0.5), expected)
    # and both equal the reference, the plain loop over lif_step
    assert torch.equal(lif_reference(current, leak, 1.0, reset, initial_membrane=0.5), expected)


@pytest.mark.parametrize("name", ["arctan", "sigmoid", "triangle"])
def test_in_place_derivative_leaves_its_input_alone_out_of_place(name):
    from spikelm.neurons import SURROGATE_DERIVATIVES_, surrogate_derivative

    x = torch.linspace(-2, 2, 101, dtype=torch.float64)
    kept = x.clone()
    derivative = surrogate_derivative(x, name, 2.0)
    assert torch.equal(x, kept)
    assert torch.equal(SURROGATE_DERIVATIVES_[name](x, 2.0), derivative)  # in place: x now holds g'(x)
    assert torch.equal(x, derivative)


def test_compiled_kernels_by_default_only_where_they_pay_with_an_eager_fallback(monkeypatch):
    from spikelm import neurons

    small = torch.randn(4, 3, 50)
    assert not neurons._use_compiled(small)  # a decode step's or a tiny model's population: eager
    assert neurons._use_compiled(torch.empty(4, neurons.COMPILED_MIN_ELEMENTS // 4))  # a training step's
    # where compilation fails, the eager path gives the same spikes and gradients, with a warning
    monkeypatch.setattr(neurons, "COMPILED_MIN_ELEMENTS", 100)
    monkeypatch.setattr(neurons, "_compile_failed", False)  # put back as it was after the test

    def broken(name):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(neurons, "_kernel", broken)
    x = (small * 2).requires_grad_()
    with pytest.warns(UserWarning, match="compiled neuron kernels unavailable"):
        spikes = lif_multistep(x, 0.5, 1.0)
    spikes.sum().backward()
    assert neurons._compile_failed and not neurons._use_compiled(small)
    reference = (small * 2).requires_grad_()
    expected = lif_reference(reference, torch.tensor(0.5), 1.0)
    expected.sum().backward()
    assert torch.equal(spikes, expected) and torch.allclose(x.grad, reference.grad, atol=1e-6)
