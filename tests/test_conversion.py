import pytest
import torch

from spikelm import SpikeLMForCausalLM
from spikelm.conversion import ann_twin_config, convert_to_snn, is_spike_driven
from spikelm.neurons import lif_multistep, qcfs
from conftest import shakespeare_text, tiny_config


@pytest.mark.parametrize("levels", [1, 2, 4, 8])
def test_qcfs_equals_if_neuron_over_its_levels_for_constant_input(levels):
    clip = 1.7
    x = torch.randn(5000, dtype=torch.float64) * 2  # below 0, inside the clip and above it
    x = x[((x * levels / clip + 0.5) - (x * levels / clip + 0.5).round()).abs() > 1e-9]  # off the exact steps
    twin = qcfs(x, torch.tensor(clip, dtype=torch.float64), levels)
    current = x.expand(levels, -1)  # the same input at each of the T = levels steps
    spikes = lif_multistep(current, 1.0, clip, reset="soft", initial_membrane=clip / 2)
    assert torch.allclose(spikes.sum(0) * clip / levels, twin, atol=1e-12)
    assert set(twin.unique().tolist()) >= {0.0, clip}


def char_blocks(vocab, block=64, count=48):
    text = shakespeare_text(40_000)
    chars = sorted(set(text))[:vocab]
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index.get(c, 0) for c in text])
    return ids[: count * block].view(count, block)


@pytest.mark.parametrize("kind, gated", [("ssa", False), ("sdsa", False), ("ssa", True)])
def test_converted_model_is_spike_driven_and_better_than_untrained(kind, gated):
    torch.manual_seed(0)
    blocks = char_blocks(48)
    train, held_out = blocks[:-8], blocks[-8:]
    spiking = tiny_config(kind, time_steps=4, hidden_size=64, intermediate_size=128, gated_decay=gated)
    twin = SpikeLMForCausalLM(ann_twin_config(spiking))
    assert twin.config.neuron_type == "qcfs" and twin.config.time_steps == 1
    optimizer = torch.optim.AdamW(twin.parameters(), lr=5e-3)
    for step in range(60):
        batch = train[torch.randint(0, len(train), (8,))]
        loss = twin(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    twin.eval()
    snn = convert_to_snn(twin).eval()
    assert snn.config.neuron_type == "if" and snn.config.time_steps == 4
    assert snn.config.initial_membrane == 0.5 and snn.config.reset == "soft"
    assert snn.config.gated_decay == gated
    assert is_spike_driven(snn, held_out[:2])
    assert not is_spike_driven(twin, held_out[:2])  # the twin passes multi-level values: an ANN
    untrained = SpikeLMForCausalLM(spiking).eval()
    with torch.no_grad():
        twin_loss = twin(held_out, labels=held_out).loss.item()
        converted_loss = snn(held_out, labels=held_out).loss.item()
        untrained_loss = untrained(held_out, labels=held_out).loss.item()
    assert torch.isfinite(torch.tensor(converted_loss))
    print(f"{kind}: twin {twin_loss:.3f}, converted {converted_loss:.3f}, untrained {untrained_loss:.3f}")
    assert converted_loss < untrained_loss - 0.2, (twin_loss, converted_loss, untrained_loss)
