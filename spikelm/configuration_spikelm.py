"""SpikeLMConfig: everything that defines a spiking decoder, in one object.

A field per choice the model makes; bad values fail at construction with a
message that names the field. Follows the transformers 5 convention: configs
are strict dataclasses, validated by `validate_*` methods.
"""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

NEURON_TYPES = ("lif", "if", "qcfs", "relu")
RESET_TYPES = ("soft", "hard")
SURROGATES = ("arctan", "sigmoid", "triangle")
ATTENTION_TYPES = ("ssa", "sdsa")
NORM_TYPES = ("layernorm", "rmsnorm")


@strict
class SpikeLMConfig(PreTrainedConfig):
    r"""
    Configuration of a spike-driven Transformer decoder (see docs/design.md, "The model").

    Example:
    ```python
    >>> from spikelm import SpikeLMConfig, SpikeLMForCausalLM
    >>> model = SpikeLMForCausalLM(SpikeLMConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2))
    ```
    """

    model_type = "spikelm"

    # --- shape ---
    vocab_size: int = 4096
    hidden_size: int = 256  # D: width of the residual stream (membrane potential)
    num_hidden_layers: int = 4
    num_attention_heads: int = 4  # H; head width d = D / H
    intermediate_size: int | None = None  # MLP width; None means 4 * hidden_size
    # Nominal context for tools that ask (lm-eval, pipelines). The model itself has
    # no position table and no limit: generation runs on a fixed-size recurrent state.
    max_position_embeddings: int = 4096

    # --- spiking neurons ---
    time_steps: int = 4  # T: spiking steps per token
    # "lif" (leaky), "if" (integrate-and-fire: leak 1), or an ANN twin's real-valued stand-in (time_steps=1):
    # "qcfs", the twin used for conversion, a clip-floor-shift activation with `quantization_levels` levels;
    # "relu", the rate clamp(x / threshold, 0, 1): the same architecture without spikes
    neuron_type: str = "lif"
    quantization_levels: int = 4  # qcfs only: the T of the spiking model it converts to
    leak: float = 0.5  # beta in v[t] = beta * v[t-1] + x[t]; ignored for "if"
    learn_leak: bool = False  # learn one leak per neuron population (kept in (0, 1))
    threshold: float = 1.0  # theta: a neuron spikes when its membrane reaches it
    initial_membrane: float = 0.0  # membrane at the start of every token (converted models start at theta / 2)
    reset: str = "soft"  # "soft": v -= theta * s (reset by subtraction); "hard": v = 0
    detach_reset: bool = False  # drop the reset from the backward pass
    surrogate: str = "arctan"  # smooth primitive whose derivative stands in for Heaviside's
    surrogate_alpha: float = 2.0  # sharpness; the triangle's half-width is 1 / alpha

    # --- attention ---
    attention_type: str = "ssa"  # "ssa": spike Q.K counts; "sdsa": channel-wise running sum
    # Per-head decay gamma_h in (0, 1]; None spreads them as 1 - 2^-(4 + 6h/H) (short to long memory).
    attention_decay: list[float] | None = None
    learn_decay: bool = False  # learn the decays (kept in (0, 1))
    # Per-token decays g_i = sigmoid(W_g s_i + b_h), read from the attention's input spikes, with b_h starting at
    # the logit of attention_decay[h] (a data-dependent forgetting, as in gated linear attention and Mamba)
    gated_decay: bool = False
    token_shift: bool = True  # K and V also see the previous token's spikes
    # Read-out scale; None means 64 / d for "ssa" (so that spikes firing at ~1/4 reach the threshold) and 1 for
    # "sdsa" (whose read-out is a mean). A list gives one per layer (conversion folds thresholds into it).
    attention_scale: float | list[float] | None = None

    # --- the rest ---
    norm_type: str = "layernorm"
    norm_eps: float = 1e-5
    initializer_range: float = 0.02  # std of the token embedding
    tie_word_embeddings: bool = False
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.attention_decay is None and self.num_attention_heads > 0:
            heads = self.num_attention_heads
            self.attention_decay = [1.0 - 2.0 ** -(4.0 + 6.0 * h / heads) for h in range(heads)]
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def leak_value(self) -> float:
        return 1.0 if self.neuron_type == "if" else self.leak

    def validate_architecture(self):
        def need(ok: bool, field: str, message: str):
            if not ok:
                raise ValueError(f"SpikeLMConfig.{field}: {message} (got {getattr(self, field)!r})")

        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "time_steps",
                      "intermediate_size", "max_position_embeddings"):
            need(getattr(self, field) >= 1, field, "must be a positive integer")
        need(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
             f"must be divisible by num_attention_heads={self.num_attention_heads}")
        need(self.neuron_type in NEURON_TYPES, "neuron_type", f"must be one of {NEURON_TYPES}")
        need(0.0 < self.leak <= 1.0, "leak", "must be in (0, 1]")
        need(self.threshold > 0.0, "threshold", "must be positive")
        need(self.reset in RESET_TYPES, "reset", f"must be one of {RESET_TYPES}")
        need(self.surrogate in SURROGATES, "surrogate", f"must be one of {SURROGATES}")
        need(self.surrogate_alpha > 0.0, "surrogate_alpha", "must be positive")
        need(self.attention_type in ATTENTION_TYPES, "attention_type", f"must be one of {ATTENTION_TYPES}")
        need(len(self.attention_decay) == self.num_attention_heads, "attention_decay",
             f"needs one decay per head ({self.num_attention_heads})")
        need(all(0.0 < g <= 1.0 for g in self.attention_decay), "attention_decay", "every decay must be in (0, 1]")
        scales = self.attention_scale if isinstance(self.attention_scale, list) else [self.attention_scale]
        need(all(scale is None or scale > 0.0 for scale in scales), "attention_scale", "must be positive")
        need(not isinstance(self.attention_scale, list) or len(scales) == self.num_hidden_layers,
             "attention_scale", f"a list needs one scale per layer ({self.num_hidden_layers})")
        need(self.quantization_levels >= 1, "quantization_levels", "must be a positive integer")
        need(self.neuron_type != "qcfs" or self.time_steps == 1, "time_steps",
             "must be 1 for the qcfs ANN twin (its levels are quantization_levels)")
        need(self.neuron_type != "relu" or self.time_steps == 1, "time_steps",
             "must be 1 for the relu ANN twin (its activations are real-valued rates)")
        need(self.norm_type in NORM_TYPES, "norm_type", f"must be one of {NORM_TYPES}")
        need(self.norm_eps > 0.0, "norm_eps", "must be positive")
        need(self.initializer_range > 0.0, "initializer_range", "must be positive")


__all__ = ["SpikeLMConfig"]
