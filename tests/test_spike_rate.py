"""The firing-rate regulariser: its penalty, where it applies, that it lowers firing, and what it logs."""

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from conftest import tiny_config
from spikelm import SpikeLMForCausalLM
from spikelm.errors import SpikeLMError
from spikelm.neurons import SpikingNeuron
from spikelm.spike_rate import SpikeRateRegulariser


def test_penalty_is_the_mean_excess_over_the_target():
    regulariser = SpikeRateRegulariser(target=0.2, weight=2.0)
    # populations at 0.3 and 0.1: excesses 0.1 and 0 -> 2 * 0.05
    assert float(regulariser.penalty([torch.tensor(0.3), torch.tensor(0.1)])) == pytest.approx(0.1)
    assert float(regulariser.penalty([torch.tensor(0.1)])) == 0.0


def test_training_forwards_add_the_penalty_of_the_chosen_populations_and_evaluation_does_not():
    model = SpikeLMForCausalLM(tiny_config("ssa")).train()
    ids = torch.randint(0, 48, (2, 12))
    rates = {}
    handles = [m.register_forward_hook(lambda m, i, o, name=name: rates.__setitem__(name, float(o.detach().mean())))
               for name, m in model.named_modules() if isinstance(m, SpikingNeuron)]
    plain = model(input_ids=ids, labels=ids).loss.item()
    regulariser = SpikeRateRegulariser(target=0.01, weight=3.0, populations=["mlp.hidden_neuron"]).attach(model)
    penalised = model(input_ids=ids, labels=ids).loss.item()
    chosen = [rate for name, rate in rates.items() if "mlp.hidden_neuron" in name]
    assert len(chosen) == 2  # one per layer
    assert penalised == pytest.approx(plain + 3.0 * sum(max(0.0, r - 0.01) for r in chosen) / 2, rel=1e-5)
    assert penalised > plain
    model.eval()
    assert float(model(input_ids=ids, labels=ids).loss) == pytest.approx(plain, rel=1e-6)
    regulariser.detach()
    for handle in handles:
        handle.remove()
    assert not any(m._forward_hooks for m in model.modules())


def _train(regulariser, steps=30):
    torch.manual_seed(0)
    model = SpikeLMForCausalLM(tiny_config("ssa")).train()
    if regulariser is not None:
        regulariser.attach(model)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 48, (8, 16), generator=data)
        model(input_ids=ids, labels=ids).loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    probe = SpikeRateRegulariser(target=0.5).attach(model)  # it tallies every layer's firing in training mode
    model(input_ids=ids, labels=ids)
    rates = probe.rates_since_last_log()
    return sum(rates.values()) / len(rates)


def test_training_with_the_penalty_fires_less():
    free = _train(None)
    held = _train(SpikeRateRegulariser(target=0.02, weight=10.0))
    assert held < 0.7 * free


def test_it_logs_each_layers_firing_rate_and_the_penalty(tmp_path):
    model = SpikeLMForCausalLM(tiny_config("ssa")).train()
    regulariser = SpikeRateRegulariser(target=0.01)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    state, control = TrainerState(), TrainerControl()
    regulariser.on_train_begin(args, state, control, model=model)
    ids = torch.randint(0, 48, (2, 12))
    model(input_ids=ids, labels=ids)
    logs = {"loss": 1.0}
    state.log_history.append(dict(logs))
    regulariser.on_log(args, state, control, logs=logs)
    assert set(logs) == {"loss", "firing_rate/layers.0", "firing_rate/layers.1", "firing_rate/head",
                         "spike_rate_penalty"}
    assert all(0 < logs[f"firing_rate/{layer}"] < 1 for layer in ("layers.0", "layers.1", "head"))
    assert logs["spike_rate_penalty"] > 0 and state.log_history[-1] == logs
    regulariser.on_train_end(args, state, control)
    assert not any(m._forward_hooks for m in model.modules())


def test_bad_settings_say_what_is_wrong():
    with pytest.raises(SpikeLMError, match="between 0 and 1"):
        SpikeRateRegulariser(target=1.5)
    with pytest.raises(SpikeLMError, match="no spiking neuron population matches"):
        SpikeRateRegulariser(target=0.1, populations=["nothing"]).attach(SpikeLMForCausalLM(tiny_config("ssa")))


def test_spikelm_train_takes_a_spike_rate_target_and_logs_the_rates(tmp_path):
    from helpers import spikelm

    run = spikelm("train", "--preset", "tiny", "--output", tmp_path / "run", "--max-steps", 4, "--logging-steps", 2,
                  "--eval-steps", 1000, "--save-steps", 1000, "--block-size", 32, "--batch-size", 4,
                  "--max-eval-blocks", 4, "--spike-rate-target", 0.01, "--spike-rate-populations", "mlp.hidden_neuron")
    assert run.returncode == 0, run.stderr[-2000:]
    import json

    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "loss" in entry]
    assert logged and all("firing_rate/layers.0" in entry and entry["spike_rate_penalty"] >= 0 for entry in logged)
    bad = spikelm("train", "--preset", "tiny", "--output", tmp_path / "bad", "--max-steps", 1,
                  "--spike-rate-target", 2.0)
    assert bad.returncode == 2 and "between 0 and 1" in bad.stderr
