"""Loading saved models and tokenizers: the one place that turns a name into a model.

Every command that is given a model (`train --model`, `distill --teacher`, `eval`, `generate`, `serve`) goes
through `load_model` / `load_model_and_tokenizer`, so a missing or half-written directory gets the same clear
message everywhere, and any causal LM that the Auto classes know loads (spikelm, GPT-2, ...).
"""

from pathlib import Path

from .errors import SpikeLMError


def require_saved_model(path, flag="--model"):
    """Raise a SpikeLMError that says what to pass unless `path` is a directory holding a saved model."""
    if not Path(path, "config.json").is_file():
        raise SpikeLMError(f"no saved model in {path}: pass {flag} a directory written by `spikelm train` or "
                           f"save_pretrained")


def load_model(path, dtype=None, flag="--model"):
    """A saved causal LM (spikelm or any Hugging Face architecture), in eval mode. `dtype`: a torch dtype or
    its name; None keeps the saved one's float32."""
    import torch
    from transformers import AutoModelForCausalLM

    import spikelm  # noqa: F401  (registers spikelm with the Auto classes)

    require_saved_model(path, flag)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, **kwargs).eval()


def has_tokenizer(path) -> bool:
    return Path(path, "tokenizer.json").exists() or Path(path, "tokenizer_config.json").exists()


def load_tokenizer(path):
    """The tokenizer saved in `path` (beside a model, or by `spikelm tokenizer`)."""
    from transformers import AutoTokenizer

    if not has_tokenizer(path):
        raise SpikeLMError(f"no tokenizer in {path}: save one beside the model, or train one with "
                           f"`spikelm tokenizer --corpus PATH --output {path}`")
    return AutoTokenizer.from_pretrained(str(path))


def load_model_and_tokenizer(path, dtype=None, flag="--model"):
    """-> (model in eval mode, its tokenizer), both from `path`."""
    model = load_model(path, dtype, flag)
    return model, load_tokenizer(path)
