"""The models spikelm is compared with, built from a spikelm config so that a comparison is fair by construction.

- `matched_gpt2_config`: a GPT-2 with spikelm's width, depth, heads and vocabulary and as many parameters in use,
  within 1%: the same tying choice as spikelm (untied; tying costs the spiking model about 10% and the ANN
  nothing), a position table sized to the block it trains on, and the MLP width making up the rest (spikelm's
  token shift makes K and V read 2D inputs, so its attention holds 2 D^2 more weights per layer than GPT-2's).
- `relu_twin_config`: the ANN twin, the same spikelm architecture (attention, decay, token shift, norms) with real-valued rates
  in place of the spiking neurons, so that a table separates what the architecture costs from what spikes cost.
"""

import torch

from .configuration_spikelm import SpikeLMConfig


def config_fields(config) -> dict:
    """A config's own fields, without what save_pretrained adds, to build a variant from."""
    settings = config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "auto_map", "_name_or_path"):
        settings.pop(key, None)
    return settings


def parameter_count(model) -> int:
    """Parameters a model holds, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters())


def _count(model_class, config) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return parameter_count(model_class(config))


def spikelm_parameters(config: SpikeLMConfig) -> int:
    """All of a spikelm model's parameters are in use: it has no position table."""
    from .modeling_spikelm import SpikeLMForCausalLM

    return _count(SpikeLMForCausalLM, config)


def gpt2_parameters(config) -> int:
    """Parameters of a GPT2LMHeadModel built from `config`; with n_positions = the block, all are in use."""
    from transformers import GPT2LMHeadModel

    return _count(GPT2LMHeadModel, config)


def matched_gpt2_config(config: SpikeLMConfig, block_size: int, **overrides):
    """The GPT2Config with as many parameters in use as the spikelm model of `config` (within 1%), for
    sequences of up to `block_size` tokens. No dropout: the spiking model has none."""
    from transformers import GPT2Config

    def gpt2(inner):
        settings = dict(vocab_size=config.vocab_size, n_embd=config.hidden_size, n_layer=config.num_hidden_layers,
                        n_head=config.num_attention_heads, n_inner=inner, n_positions=block_size,
                        tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                        pad_token_id=config.pad_token_id)
        settings.update(overrides)
        return GPT2Config(**settings)

    # GPT-2's count grows linearly with the MLP width: (2 D + 1) parameters per unit and layer
    target = spikelm_parameters(config)
    base = gpt2_parameters(gpt2(1))
    per_unit = gpt2_parameters(gpt2(2)) - base
    inner = max(1, 1 + round((target - base) / per_unit))
    return gpt2(inner)


def relu_twin_config(config: SpikeLMConfig) -> SpikeLMConfig:
    """The same architecture with real-valued rates (neuron_type "relu", one time step) in place of spikes."""
    settings = config_fields(config)
    settings.update(neuron_type="relu", time_steps=1, learn_leak=False, initial_membrane=0.0)
    return SpikeLMConfig(**settings)


__all__ = ["config_fields", "gpt2_parameters", "matched_gpt2_config", "parameter_count", "relu_twin_config",
           "spikelm_parameters"]
