"""Loading saved models and tokenizers: the one place that turns a name into a model.

A name is what `from_pretrained` takes: a local directory, or a Hugging Face hub id ("gpt2",
"HuggingFaceTB/SmolLM2-135M") with an optional revision (branch, tag or commit). A hub id resolves the way
transformers resolves it: the local cache first (HF_HOME / HF_HUB_CACHE), a download unless HF_HUB_OFFLINE=1,
a token from the environment (HF_TOKEN) for private repositories.

Every command that is given a model (`train --model`, `distill --teacher`, `eval`, `generate`, `serve`) goes
through `require_saved_model` and `load_model` / `load_tokenizer`, so a name that leads nowhere gets the same
clear message everywhere, and any causal LM the Auto classes know loads (spikelm, GPT-2, Llama, ...).
"""

from pathlib import Path

from .errors import SpikeLMError


def _is_local(name) -> bool:
    """A path rather than a hub id: it exists, or is spelt like a path (absolute, ./, ~, or deeper than org/name)."""
    text = str(name)
    return Path(text).exists() or text.startswith((".", "/", "~")) or text.count("/") > 1


def require_saved_model(name, flag="--model", revision=None):
    """Raise a SpikeLMError that says what to do unless `name` is a directory holding a saved model or a hub id
    whose config can be had (from the cache, or downloaded when that is allowed)."""
    if _is_local(name):
        if revision is not None:
            raise SpikeLMError(f"{name} is a local directory: --revision only applies to hub ids")
        if not Path(name, "config.json").is_file():
            raise SpikeLMError(f"no saved model in {name}: pass {flag} a directory written by `spikelm train` or "
                               f"save_pretrained, or a hub id")
        return
    from huggingface_hub import constants
    from transformers.utils import cached_file

    try:
        cached_file(str(name), "config.json", revision=revision)
    except (OSError, ValueError) as error:
        at = f" at revision {revision!r}" if revision else ""
        if constants.HF_HUB_OFFLINE:
            raise SpikeLMError(
                f"no saved model in {name}: it is not a local directory, and the hub id {name!r}{at} is not in the "
                f"Hugging Face cache ({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE=1 forbids downloading it: "
                f"download it once with network access, mount a cache that holds it at HF_HOME, or pass {flag} "
                f"a local directory") from None
        reason = str(error).strip().splitlines()[0]
        raise SpikeLMError(f"no saved model in {name}: it is not a local directory, and the hub did not give "
                           f"{name!r}{at} ({reason}); check the id, or set HF_TOKEN for a private one") from None


def load_model(name, dtype=None, flag="--model", revision=None):
    """A saved causal LM (spikelm or any Hugging Face architecture), in eval mode. `dtype`: a torch dtype or
    its name; None keeps the saved one."""
    import torch
    from transformers import AutoModelForCausalLM

    import spikelm  # noqa: F401  (registers spikelm with the Auto classes)

    require_saved_model(name, flag, revision)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return AutoModelForCausalLM.from_pretrained(str(name), revision=revision, trust_remote_code=True,
                                                **kwargs).eval()


def has_tokenizer(path) -> bool:
    """Whether a local directory holds a saved tokenizer."""
    return Path(path, "tokenizer.json").exists() or Path(path, "tokenizer_config.json").exists()


def load_tokenizer(name, revision=None):
    """The tokenizer saved in a directory (beside a model, or by `spikelm tokenizer`) or in a hub repository."""
    from transformers import AutoTokenizer

    if _is_local(name) and not has_tokenizer(name):
        raise SpikeLMError(f"no tokenizer in {name}: save one beside the model, or train one with "
                           f"`spikelm tokenizer --corpus PATH --output {name}`")
    try:
        return AutoTokenizer.from_pretrained(str(name), revision=revision)
    except (OSError, ValueError) as error:
        raise SpikeLMError(f"no tokenizer could be loaded from {name} ({str(error).strip().splitlines()[0]})") \
            from None


def load_model_and_tokenizer(name, dtype=None, flag="--model", revision=None):
    """-> (model in eval mode, its tokenizer), both from `name`."""
    model = load_model(name, dtype, flag, revision)
    return model, load_tokenizer(name, revision)
