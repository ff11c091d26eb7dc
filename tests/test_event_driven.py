import pytest
import torch
import torch.nn.functional as F

from spikelm import SpikeLMForCausalLM
from spikelm import event_driven, kernels
from spikelm.event_driven import SpikeLinear, compacted_matmul, event_driven_matmul, set_event_driven
from conftest import tiny_config


def spikes(*shape, rate=0.1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=generator) < rate).float()


@pytest.fixture(params=["kernel", "torch"])
def event_path(request, monkeypatch):
    """Each test runs on the C kernel and on the PyTorch forms that stand in where there is no C compiler; it
    yields a list that gets one entry per event-driven matmul computed."""
    if request.param == "kernel":
        assert kernels.available()  # the machines we test on have a C compiler: never skip this silently
    else:
        monkeypatch.setattr(kernels, "_library", False)  # as where no C compiler is found
    computed = []

    def counting(name, original):
        def wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            if out is not None:  # the kernel answers None when it leaves the matmul to the dense path
                computed.append(name)
            return out
        return wrapper

    for name in ("spike_matmul_kernel", "_compacted", "_gather_sum"):
        monkeypatch.setattr(event_driven, name, counting(name, getattr(event_driven, name)))
    return computed


@pytest.mark.parametrize("form", ["gather", "compacted", "kernel"])
@pytest.mark.parametrize("counts", [False, True])
def test_event_driven_forms_equal_the_dense_matmul(counts, form):
    torch.manual_seed(0)
    weight = torch.randn(96, 200)  # [out, in], float32 weights
    x = spikes(4, 3, 200, rate=0.2)
    if counts:  # whole-number spike counts 0..4, as the LM head gets them
        x = spikes(4, 3, 200, rate=0.3, seed=1) + spikes(4, 3, 200, rate=0.3, seed=2) * 3
    x[..., :50] = 0  # inputs silent in every row: the compacted form and the kernel read none of their weights
    matmul = {"gather": lambda x, w: event_driven_matmul(x, w, counts=counts), "compacted": compacted_matmul,
              "kernel": lambda x, w: kernels.spike_matmul(x.reshape(-1, 200), w).view(4, 3, 96)}[form]
    dense64 = x.double() @ weight.double().t()
    event64 = matmul(x.double(), weight.double().t().contiguous())
    assert torch.equal(event64, dense64)  # float64: sums of float32 weights are exact in any order
    event32 = matmul(x, weight.t().contiguous())
    assert torch.allclose(event32, x @ weight.t(), rtol=0, atol=1e-4)  # float32: rounding only
    assert event32.shape == (4, 3, 96) and event32.abs().sum() > 0
    if form == "kernel":  # the same sums in the same order as the gather-sum: equal in float32 too
        assert torch.equal(event32, event_driven_matmul(x, weight.t().contiguous(), counts=counts))
        assert kernels.spike_matmul(x.reshape(-1, 200), weight.t().contiguous(), max_nonzero=10) is None


def test_spike_linear_takes_the_event_path_only_when_sparse_and_not_training(event_path):
    torch.manual_seed(0)
    layer = SpikeLinear(300, 200).double()  # 60,000 weights: above EVENT_DRIVEN_MIN_WEIGHTS
    # firing rates 0.05 and 0.6 (active fractions ~0.19 and ~0.97): below and above both crossovers
    sparse, dense = spikes(4, 1, 300, rate=0.05).double(), spikes(4, 1, 300, rate=0.6).double()
    with torch.no_grad():
        assert torch.equal(layer(sparse), sparse @ layer.weight.t())
        assert len(event_path) == 1
        assert torch.equal(layer(dense), dense @ layer.weight.t())
        assert len(event_path) == 1  # above the crossover: dense
    out = layer(sparse.requires_grad_())  # autograd on, 4 rows: dense, with gradients
    out.sum().backward()
    assert len(event_path) == 1 and layer.weight.grad is not None
    with torch.no_grad():  # the transposed copy follows the weight when it changes
        layer.weight.mul_(2)
        assert torch.equal(layer(sparse.detach()), sparse.detach() @ layer.weight.t())
        assert len(event_path) == 2
        small, sparse = SpikeLinear(100, 20).double(), spikes(4, 1, 100, rate=0.05).double()
        assert torch.equal(small(sparse), sparse @ small.weight.t())  # 2,000 weights: in cache anyway, dense
        assert len(event_path) == 2
        small.batch_invariant = True  # ... unless every row must be summed in its own fixed order
        assert torch.equal(small(sparse), sparse @ small.weight.t())
        assert len(event_path) == 3


def test_training_matmul_over_the_spikes_gives_the_dense_gradients(monkeypatch):
    # autograd on, many rows, sparse input: SpikeMatmul (the forward and the weight's gradient over the firing
    # inputs only, in C); its numbers and gradients are the dense matmul's (float64: to rounding of 1e-12)
    assert kernels.available()
    calls = []
    forward, grad_weight = event_driven.spike_matmul_rows_kernel, event_driven.spike_grad_weight_kernel
    monkeypatch.setattr(event_driven, "spike_matmul_rows_kernel", lambda *a: calls.append("forward") or forward(*a))
    monkeypatch.setattr(event_driven, "spike_grad_weight_kernel",
                        lambda *a: calls.append("weight") or grad_weight(*a))
    torch.manual_seed(0)
    layer = SpikeLinear(96, 40, bias=True).double()
    x = spikes(4, 200, 96, rate=0.1).double().requires_grad_()  # 800 rows >= TRAINING_MIN_ROWS
    out = layer(x)
    assert calls == ["forward"]
    grad = torch.randn_like(out)
    out.backward(grad)
    sparse_grads = x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone()
    x.grad, layer.weight.grad, layer.bias.grad = None, None, None
    dense = F.linear(x, layer.weight, layer.bias)
    dense.backward(grad)
    assert calls == ["forward", "weight"]
    assert (out - dense).abs().max() <= 1e-12
    for got, expected in zip(sparse_grads, (x.grad, layer.weight.grad, layer.bias.grad)):
        assert (got - expected).abs().max() <= 1e-12
    # above TRAINING_MAX_RATE, or without the event-driven paths: the dense matmul
    layer(spikes(4, 200, 96, rate=0.7).double().requires_grad_()).sum().backward()
    set_event_driven(layer, False)
    layer(x).sum().backward()
    with torch.no_grad():
        layer(x)  # inference, 800 rows: above EVENT_DRIVEN_MAX_ROWS
    assert calls == ["forward", "weight"]


@pytest.mark.parametrize("kind", ["ssa", "sdsa"])
def test_generation_event_driven_equals_dense(kind, event_path, monkeypatch):
    # float64: the same logits bit for bit; float32: the same tokens here, logits within rounding
    monkeypatch.setattr(event_driven, "EVENT_DRIVEN_MIN_WEIGHTS", 0)  # the tiny model's matrices take it too
    torch.manual_seed(0)
    model = SpikeLMForCausalLM(tiny_config(kind, hidden_size=64, intermediate_size=128)).eval()
    ids = torch.randint(0, 48, (1, 10))
    for dtype in (torch.float64, torch.float32):
        model = model.to(dtype)
        results = []
        for enabled in (True, False):
            event_driven.set_event_driven(model, enabled)
            event_path.clear()
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0,
                                     output_logits=True, return_dict_in_generate=True)
            assert (len(event_path) > 0) == enabled  # the event-driven path did run (only) when enabled
            results.append((out.sequences, torch.stack(out.logits)))
        event_driven.set_event_driven(model, True)
        (tokens_event, logits_event), (tokens_dense, logits_dense) = results
        assert torch.equal(tokens_event, tokens_dense)
        if dtype == torch.float64:
            assert torch.equal(logits_event, logits_dense)
        else:
            assert torch.allclose(logits_event, logits_dense, rtol=0, atol=1e-4)


def test_batch_invariant_float32_a_row_alone_equals_it_in_a_batch_of_32(event_path):
    torch.manual_seed(0)
    model = SpikeLMForCausalLM(tiny_config("ssa", hidden_size=64, intermediate_size=128)).eval()
    ids = torch.randint(0, 48, (32, 6))
    event_driven.set_batch_invariant(model, True)
    with torch.no_grad():
        batch = model(ids, use_cache=True)
        batch_step = model(ids[:, :1], cache=batch.cache, use_cache=True).logits
        for row in (0, 7, 31):
            alone = model(ids[row:row + 1], use_cache=True)
            alone_step = model(ids[row:row + 1, :1], cache=alone.cache, use_cache=True).logits
            assert torch.equal(alone.logits[0], batch.logits[row])
            assert torch.equal(alone_step[0], batch_step[row])
    assert event_path  # every matrix through the kernel or the gather-sum


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_event_driven_and_compiled_neurons_equal_the_cpu():
    from spikelm import neurons

    torch.manual_seed(0)
    model = SpikeLMForCausalLM(tiny_config("ssa", hidden_size=64, intermediate_size=128)).double().eval()
    ids = torch.randint(0, 48, (1, 10))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        model = model.cuda()
        event_driven.set_batch_invariant(model, True)  # every matrix through the gather-sum on the GPU
        neurons.enable_compiled_kernels(True)
        try:
            got = model.generate(ids.cuda(), max_new_tokens=8, do_sample=False, pad_token_id=0)
        finally:
            neurons.enable_compiled_kernels(None)
    assert torch.equal(got.cpu(), expected)  # float64: the same sums whatever the device and order
