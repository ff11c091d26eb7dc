"""spikelm: spiking language models that train with Hugging Face, generate, and count their energy."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_spikelm import SpikeLMConfig
from .energy import EnergyCounter, count_energy, energy_report, gpt2_reference_counts
from .modeling_spikelm import SpikeLMCache, SpikeLMForCausalLM, SpikeLMModel

__version__ = "0.1.0"

AutoConfig.register("spikelm", SpikeLMConfig, exist_ok=True)
AutoModel.register(SpikeLMConfig, SpikeLMModel, exist_ok=True)
AutoModelForCausalLM.register(SpikeLMConfig, SpikeLMForCausalLM, exist_ok=True)
# A saved directory carries the code and `auto_map`, so that tools that never import spikelm load it with
# trust_remote_code=True (lm-evaluation-harness, a plain transformers script).
SpikeLMConfig.register_for_auto_class()
SpikeLMModel.register_for_auto_class("AutoModel")
SpikeLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["EnergyCounter", "SpikeLMCache", "SpikeLMConfig", "SpikeLMForCausalLM", "SpikeLMModel", "count_energy",
           "energy_report", "gpt2_reference_counts"]
