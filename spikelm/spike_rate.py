"""A firing-rate knob: a training penalty on neuron populations that fire above a target rate.

Energy per token falls with the firing rate (every spike costs a column of weight reads and accumulates), so
a penalty on firing buys energy with accuracy:

    loss = task loss + weight * mean over the chosen populations p of max(0, rate_p - target)

rate_p is population p's mean firing rate in this forward (spikes per neuron and step), differentiable through
the surrogate gradient. Only training forwards are penalised; evaluation losses stay the task's own.

    trainer = Trainer(..., callbacks=[SpikeRateRegulariser(target=0.05)])

It attaches its hooks when training begins and logs, at each logging step, the firing rate of every layer
(`firing_rate/layers.0`, ...) and the mean penalty since the last log (`spike_rate_penalty`).
"""

from collections import defaultdict

import torch
from transformers import TrainerCallback

from .energy import _layer_label
from .errors import SpikeLMError
from .modeling_spikelm import SpikeLMForCausalLM
from .neurons import SpikingNeuron


class SpikeRateRegulariser(TrainerCallback):
    """target: the firing rate above which a population is penalised (0 < target < 1); weight: the penalty's
    scale against the task loss; populations: substrings of the neuron modules' names to penalise (for
    example "mlp.hidden_neuron" or "attention."); None penalises every spiking neuron population."""

    def __init__(self, target: float, weight: float = 1.0, populations: list[str] | None = None):
        if not 0.0 < target < 1.0:
            raise SpikeLMError(f"spike rate target must be a firing rate between 0 and 1 (got {target})")
        if weight <= 0:
            raise SpikeLMError(f"spike rate weight must be positive (got {weight})")
        self.target, self.weight = float(target), float(weight)
        self.populations = list(populations) if populations else None
        self._handles = []
        self._rates = []  # the chosen populations' rates in the current forward (with their gradients)
        self._spikes = defaultdict(float)  # layer -> spikes since the last log (all populations)
        self._steps = defaultdict(int)  # layer -> neuron-steps since the last log
        self._penalties = []

    def _chosen(self, name):
        return self.populations is None or any(p in name for p in self.populations)

    def attach(self, model):
        """Hook every spiking neuron of `model` (a SpikeLMForCausalLM, or a wrapper holding one)."""
        self.detach()
        chosen = 0
        for name, module in model.named_modules():
            if isinstance(module, SpikingNeuron):
                self._handles.append(module.register_forward_hook(self._neuron_hook(_layer_label(name),
                                                                                    self._chosen(name))))
                chosen += self._chosen(name)
            elif isinstance(module, SpikeLMForCausalLM):
                self._handles.append(module.register_forward_hook(self._add_penalty))
        if chosen == 0:
            raise SpikeLMError(f"no spiking neuron population matches {self.populations}: name a part of a neuron "
                             "module's name, e.g. 'mlp.hidden_neuron' or 'attention.'")
        return self

    def detach(self):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _neuron_hook(self, layer, chosen):
        def hook(module, inputs, spikes):
            if not module.training:
                return
            if chosen:
                self._rates.append(spikes.mean())
            self._spikes[layer] += float(spikes.detach().sum())
            self._steps[layer] += spikes.numel()
        return hook

    def penalty(self, rates):
        """weight * mean over populations of max(0, rate - target)."""
        return self.weight * torch.stack([torch.relu(rate - self.target) for rate in rates]).mean()

    def _add_penalty(self, module, inputs, output):
        rates, self._rates = self._rates, []
        if module.training and rates and getattr(output, "loss", None) is not None:
            penalty = self.penalty(rates)
            self._penalties.append(float(penalty.detach()))
            output.loss = output.loss + penalty.to(output.loss.dtype)
        return output

    def rates_since_last_log(self) -> dict:
        """{"firing_rate/layers.0": rate, ..., "spike_rate_penalty": mean penalty}; resets the tallies."""
        logs = {f"firing_rate/{layer}": self._spikes[layer] / self._steps[layer] for layer in self._steps}
        if self._penalties:
            logs["spike_rate_penalty"] = sum(self._penalties) / len(self._penalties)
        self._spikes.clear(), self._steps.clear(), self._penalties.clear()
        return logs

    # --- TrainerCallback
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.attach(model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:  # a training log: add the layers' firing rates
            rates = self.rates_since_last_log()
            logs.update(rates)
            if state.log_history:
                state.log_history[-1].update(rates)

    def on_train_end(self, args, state, control, **kwargs):
        self.detach()
