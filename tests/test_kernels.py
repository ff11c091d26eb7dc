import pytest
import torch

from spikelm import kernels, neurons
from spikelm.neurons import lif_multistep


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reset", ["soft", "hard"])
@pytest.mark.parametrize("leak", [0.5, 0.6, 1.0])
def test_lif_kernel_gives_the_spikes_of_the_pytorch_step(dtype, reset, leak):
    assert kernels.available()
    current = torch.randn(4, 3, 500, dtype=dtype) * 1.5
    leak = torch.tensor(leak, dtype=dtype)
    for initial in (0.0, 0.5):
        expected = lif_multistep(current, leak, 1.0, reset, initial_membrane=initial)  # autograd's fast path
        got = kernels.lif(current, leak.item(), 1.0, reset == "soft", initial)
        assert torch.equal(got, expected) and got.dtype == dtype
        assert 0 < got.mean() < 1
        # each batch row's spikes, counted as they fire (rows of 500 neurons: blocks that straddle two rows)
        counted, row_spikes = kernels.lif(current, leak.item(), 1.0, reset == "soft", initial, count_rows=True)
        assert torch.equal(counted, expected) and row_spikes == expected.sum(dim=(0, 2)).long().tolist()
    # a non-contiguous input (a view) gives the same spikes
    wide = torch.randn(4, 6, dtype=dtype)
    assert torch.equal(kernels.lif(wide[:, ::2], 0.5, 1.0, True, 0.0),
                       kernels.lif(wide[:, ::2].contiguous(), 0.5, 1.0, True, 0.0))


def test_spike_counts_by_hand():
    # one neuron, leak 0.5, threshold 1, soft reset: h = 0.6, 1.3 (spike, v = 0.3), 0.15 + 1.0 = 1.15 (spike)
    current = torch.tensor([[0.6], [1.0], [1.0]])
    assert kernels.lif(current, 0.5, 1.0, True, 0.0).flatten().tolist() == [0.0, 1.0, 1.0]
    # hard reset: 0.6, 1.3 (spike, v = 0), 1.0 (spike)
    assert kernels.lif(current, 0.5, 1.0, False, 0.0).flatten().tolist() == [0.0, 1.0, 1.0]
    x = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 1.0]])  # two rows; input 1 never fires
    weight_t = torch.tensor([[1.0, 10.0], [100.0, 1000.0], [0.5, 0.25]])
    assert kernels.spike_matmul(x, weight_t).tolist() == [[2.0, 10.5], [0.5, 0.25]]
    assert kernels.spike_matmul(x, weight_t, max_nonzero=2) is None  # 3 non-zeros: left to the dense matmul


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_training_kernels_sum_like_the_decode_kernel_on_any_number_of_threads(dtype):
    torch.manual_seed(0)
    x = (torch.rand(700, 96) < 0.2).to(dtype)
    x[::5] *= 3  # spike counts too
    weight_t, grad = torch.randn(96, 40, dtype=dtype), torch.randn(700, 40, dtype=dtype)
    out = kernels.spike_matmul_rows(x, weight_t)
    assert torch.equal(out, kernels.spike_matmul(x, weight_t))  # rows outside, the same sums in the same order
    grad_t = kernels.spike_grad_weight(x, grad)
    assert grad_t.shape == (96, 40) and torch.allclose(grad_t, x.t() @ grad, atol=1e-4)
    for threads in (2, 3, 7):  # each output is summed by one thread in one order: the same numbers
        assert torch.equal(kernels.spike_matmul_rows(x, weight_t, threads), out)
        assert torch.equal(kernels.spike_grad_weight(x, grad, threads), grad_t)
    assert kernels.count_nonzero(x) == int(torch.count_nonzero(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("out_features", [275, 1024, 1100])
def test_kernels_sum_in_input_and_row_order(dtype, out_features):
    # wide enough for the register-held slices of the output (1 KiB), a one-vector remainder and a scalar tail
    # (275), wider than the decode kernel's row-by-row form (1100: inputs outside), and rows in several blocks of
    # the gradient plus a part block: the sums are the plain loops', in increasing input (forward, training's and
    # decoding's kernels, one row or many) and row (gradient) order, bit for bit
    torch.manual_seed(1)
    x = (torch.rand(150, 70) < 0.2).to(dtype)
    x[1::7] *= 2  # some rows of spike counts among rows of spikes
    weight_t, grad = torch.randn(70, out_features, dtype=dtype), torch.randn(150, out_features, dtype=dtype)
    expected_out = torch.zeros(150, out_features, dtype=dtype)
    for i in range(70):
        expected_out += x[:, i:i + 1] * weight_t[i]
    expected_grad_t = torch.zeros(70, out_features, dtype=dtype)
    for r in range(150):
        expected_grad_t += x[r, :, None] * grad[r]
    for threads in (1, 2):
        assert torch.equal(kernels.spike_matmul_rows(x, weight_t, threads), expected_out)
        assert torch.equal(kernels.spike_grad_weight(x, grad, threads), expected_grad_t)
    assert torch.equal(kernels.spike_matmul(x, weight_t), expected_out)
    assert torch.equal(kernels.spike_matmul(x[1:2], weight_t), expected_out[1:2])  # one row of counts
    assert torch.equal(kernels.spike_matmul(x[:4], weight_t), expected_out[:4])


def test_weight_gradient_by_hand():
    x = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 1.0]])  # input 1 never fires: its gradient row is 0
    grad = torch.tensor([[1.0, 10.0], [100.0, 1000.0]])
    # grad_t[i] = sum_r x[r, i] grad[r]: input 0 -> row 0; input 2 -> 2 * row 0 + row 1
    assert kernels.spike_grad_weight(x, grad, threads=2).tolist() == [[1.0, 10.0], [0.0, 0.0], [102.0, 1020.0]]
    assert kernels.spike_matmul_rows(x, torch.tensor([[1.0], [5.0], [0.5]])).tolist() == [[2.0], [0.5]]


def test_without_a_compiler_the_pytorch_paths_run(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_library", None)  # as in a fresh process
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SPIKELM_CACHE", str(tmp_path / "cache"))  # nothing built here yet
    assert not kernels.available() and not kernels.supports(torch.zeros(1))
    current = torch.randn(4, 2, 64)
    assert torch.equal(neurons.lif_inference(current, 0.5, 1.0), lif_multistep(current, 0.5, 1.0))
    monkeypatch.setattr(kernels, "_library", None)
    monkeypatch.setenv("SPIKELM_C_KERNELS", "0")  # switched off
    monkeypatch.delenv("CC")
    assert not kernels.available()


def test_built_once_into_the_cache_and_loaded_from_it(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_library", None)
    monkeypatch.setenv("SPIKELM_CACHE", str(tmp_path))
    assert kernels.available()
    built = list((tmp_path / "kernels").glob("spikelm_kernels_*.so"))
    assert len(built) == 1
    monkeypatch.setattr(kernels, "_library", None)
    monkeypatch.setattr(kernels, "_build", lambda target: pytest.fail("built again"))
    assert kernels.available()  # loaded from the cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ssa_step_kernel_is_the_recurrent_form(dtype):
    from spikelm.modeling_spikelm import MIN_DECAY_SUM, _inverse

    T, B, H, d = 2, 3, 4, 16
    generator = torch.Generator().manual_seed(0)
    q, k, v = ((torch.rand(T, B, H, d, generator=generator) < 0.3).to(dtype) for _ in range(3))
    state = torch.rand(T, B, H, d, d, generator=generator).to(dtype)
    z = torch.rand(B, H, generator=generator).to(dtype) * 5
    z[1] = 0  # a row that has seen no token yet ...
    mask = torch.tensor([1.0, 0.0, 1.0], dtype=dtype)  # ... and is padded now: it reads out 0
    for decay in (torch.rand(B, H, generator=generator).to(dtype), torch.rand(1, H, generator=generator).to(dtype)):
        expected_state = decay[..., None, None] * state + k[..., :, None] * v[..., None, :]
        expected_z = decay * z + mask[:, None]
        expected = 0.5 * (q[..., None, :] @ expected_state).squeeze(-2) * _inverse(expected_z)[None, ..., None]
        got, got_z = kernels.ssa_step(state, q, k, v, decay, z, mask, 0.5, MIN_DECAY_SUM)  # state: in place
        assert torch.equal(state, expected_state) and torch.equal(got_z, expected_z)  # k_i v_j is 0 or 1
        assert torch.allclose(got, expected, rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=0)
        assert got[:, 1].abs().sum() == 0 and got.abs().sum() > 0
        z = got_z
