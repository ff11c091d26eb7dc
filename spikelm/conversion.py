"""ANN-to-SNN conversion: train an ANN twin with QCFS activations, then put IF neurons in their place.

The twin is a spikelm model whose every spiking neuron is a clip-floor-shift activation with L levels
(`neuron_type="qcfs"`, `time_steps=1`): it trains at ANN cost. Converting it gives a spikelm model with
T = L integrate-and-fire neurons, soft reset, membrane starting at half the threshold (Bu et al., ICLR 2022:
for constant inputs an IF neuron then emits exactly what QCFS computes).

Each learned clip (lambda) becomes a threshold. Rather than give every population its own threshold, the
conversion folds the clips into the weights, so that all neurons keep threshold 1:
- what feeds a neuron is divided by its lambda (norm gain and bias, the rows of a weight matrix, the attention
  read-out's scale), since an IF neuron with threshold lambda fed x fires like one with threshold 1 fed x/lambda;
- what reads a neuron's spikes is multiplied by its lambda (the columns of the next weight matrix, the
  attention scale for q, k and v), since the twin passed on lambda * (spike count) / L.
What does not carry over exactly (the conversion gap): inputs that change over the T steps, and the
attention products of spikes, whose mean over steps is not the product of the means. Distillation closes it.
"""

import copy

import torch
from torch import nn

from .configuration_spikelm import SpikeLMConfig
from .errors import SpikeLMError
from .modeling_spikelm import SpikeLMForCausalLM
from .references import config_fields


def ann_twin_config(config: SpikeLMConfig, levels: int | None = None) -> SpikeLMConfig:
    """The ANN twin of a spiking config: same shape, QCFS activations with `levels` (default: its T) levels."""
    settings = config_fields(config)
    levels = levels or config.time_steps
    settings.update(neuron_type="qcfs", quantization_levels=levels, time_steps=1, threshold=1.0,
                    initial_membrane=0.0, learn_leak=False)
    return SpikeLMConfig(**settings)


def _scale_norm(norm, factor):
    with torch.no_grad():
        norm.weight.mul_(factor)
        if getattr(norm, "bias", None) is not None:
            norm.bias.mul_(factor)


@torch.no_grad()
def convert_to_snn(twin: SpikeLMForCausalLM) -> SpikeLMForCausalLM:
    """An IF spiking model (T = the twin's levels, soft reset, membrane starting at threshold / 2) with the
    twin's clips folded into its weights. The twin is left unchanged."""
    config = twin.config
    if config.neuron_type != "qcfs":
        raise SpikeLMError("convert needs an ANN twin (neuron_type 'qcfs'): train one with `spikelm convert`")
    layers = twin.model.layers
    base_scales = [layer.attention.scale for layer in layers]
    settings = config_fields(config)
    settings.update(neuron_type="if", time_steps=config.quantization_levels, threshold=1.0, initial_membrane=0.5,
                    reset="soft", learn_leak=False)

    # attention scales absorb the clips of q, k, v (readers) and of the read-out neuron (fed)
    scales = []
    for layer, scale in zip(layers, base_scales):
        attention = layer.attention
        lam = {name: float(getattr(attention, name).threshold) for name in
               ("q_neuron", "k_neuron", "v_neuron", "readout_neuron")}
        if attention.kind.q_masks_readout:  # the running mean of k*v feeds the read-out neuron; q only masks
            scales.append(scale * lam["k_neuron"] * lam["v_neuron"] / lam["readout_neuron"])
        else:
            scales.append(scale * lam["q_neuron"] * lam["k_neuron"] * lam["v_neuron"] / lam["readout_neuron"])
    settings["attention_scale"] = scales
    snn = SpikeLMForCausalLM(SpikeLMConfig(**settings))
    state = {k: v for k, v in copy.deepcopy(twin.state_dict()).items() if not k.endswith(".clip")}
    snn.load_state_dict(state, strict=True)

    for twin_layer, layer in zip(layers, snn.model.layers):
        a = float(twin_layer.attention_neuron.threshold)
        att = twin_layer.attention
        q, k, v = (float(getattr(att, n).threshold) for n in ("q_neuron", "k_neuron", "v_neuron"))
        r = float(att.readout_neuron.threshold)
        m = float(twin_layer.mlp_neuron.threshold)
        h = float(twin_layer.mlp.hidden_neuron.threshold)
        D = config.hidden_size
        _scale_norm(layer.attention_norm, 1 / a)
        layer.attention.q_proj.weight.mul_(a / q)
        layer.attention.kv_proj.weight[:D].mul_(a / k)
        layer.attention.kv_proj.weight[D:].mul_(a / v)
        # o_proj reads the read-out spikes (ssa) or q masked by them (sdsa)
        layer.attention.o_proj.weight.mul_(q * r if att.kind.q_masks_readout else r)
        if layer.attention.gate_proj is not None:  # the gate reads the attention neuron's spikes
            layer.attention.gate_proj.weight.mul_(a)
        _scale_norm(layer.mlp_norm, 1 / m)
        layer.mlp.fc_in.weight.mul_(m / h)
        layer.mlp.fc_out.weight.mul_(h)
    out = float(twin.model.output_neuron.threshold)
    _scale_norm(snn.model.norm, 1 / out)
    snn.lm_head.weight.mul_(out)
    return snn.to(next(twin.parameters()).dtype).train(twin.training)


def is_spike_driven(model, input_ids) -> bool:
    """True when every weight matrix receives only 0s and 1s on this input, and the LM head (fed_spike_counts)
    the per-token count of its input spikes: whole numbers 0..T."""
    binary = []
    time_steps = model.config.time_steps

    def check(module, inputs, output):
        x = inputs[0]
        if getattr(module, "fed_spike_counts", False):
            binary.append(bool(((x >= 0) & (x <= time_steps) & (x == x.round())).all()))
        else:
            binary.append(bool(((x == 0) | (x == 1)).all()))

    handles = [m.register_forward_hook(check) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            model(input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return all(binary)


# ================================================================ training a twin and converting it

TWIN_DIR = "ann-twin"


def train_and_convert(config: SpikeLMConfig, data, options, levels: int | None = None) -> dict:
    """Train the ANN twin of `config` (spikelm.training.train, in options.output/ann-twin), convert it, and
    evaluate both on the same held-out blocks. The converted model and its tokenizer are saved in
    options.output with conversion.json (this report: both bits per byte and the gap)."""
    import dataclasses
    import json
    from pathlib import Path

    from .training import SpikeLMTrainer, train, write_card

    output = Path(options.output)
    twin_options = dataclasses.replace(options, output=str(output / TWIN_DIR))  # the twin trains in a folder of its own
    trainer = train(ann_twin_config(config, levels), data, twin_options)
    twin_metrics = trainer.evaluate()
    snn = convert_to_snn(trainer.model)
    converted = SpikeLMTrainer(model=snn, args=trainer.args, eval_dataset=data.blocks.held_out,
                               processing_class=data.tokenizer, held_out_tokens=data.blocks.held_out_tokens,
                               held_out_bytes=data.blocks.held_out_bytes)
    snn_metrics = converted.evaluate()
    report = {"twin_bits_per_byte": twin_metrics["eval_bits_per_byte"],
              "converted_bits_per_byte": snn_metrics["eval_bits_per_byte"],
              "gap_bits_per_byte": snn_metrics["eval_bits_per_byte"] - twin_metrics["eval_bits_per_byte"],
              "time_steps": snn.config.time_steps, "twin": str(output / TWIN_DIR)}
    if trainer.is_world_process_zero():
        snn.save_pretrained(output)
        data.tokenizer.save_pretrained(output)
        (output / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
        write_card(output, snn, {"eval_bits_per_byte": report["converted_bits_per_byte"]}, data, options,
                   base=str(output / TWIN_DIR))
        print(f"ANN twin: {report['twin_bits_per_byte']:.3f} bits per byte; converted to T={snn.config.time_steps} "
              f"IF neurons: {report['converted_bits_per_byte']:.3f} (gap {report['gap_bits_per_byte']:+.3f}); "
              f"saved to {output}. Close the gap with: spikelm distill --model {output} "
              f"--teacher {output / TWIN_DIR} --output ...")
    return report
