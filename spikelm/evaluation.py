"""Perplexity and bits per byte of a held-out text, and the energy report of a model reading it
(`spikelm eval perplexity` / `spikelm eval energy`).

What is counted. The text is read as UTF-8 and encoded without special tokens; a start token is put in
front (the tokenizer's BOS, else its EOS, as GPT-2 and lm-evaluation-harness do), so that every token of
the text is predicted, the first one included. Then
    perplexity     = exp(total nats / predicted tokens)        (depends on the tokenizer)
    bits per byte  = total nats / ln 2 / UTF-8 bytes of the text  (compares models whatever their tokenizer)
Without any start token the first token is not predicted; the result says so (`first_token_predicted`).

How the text is run. A spikelm model has no context window: it reads the whole text in chunks, carrying
its recurrent state (SpikeLMCache) from one chunk to the next; the last logits of a chunk predict the first
token of the next one, so the result is that of one pass over the whole text. Any other causal LM (the
GPT-2 reference) gets the usual sliding window: windows of its context length, moved by `stride` tokens,
each scoring only the tokens the previous window did not.
"""

import math
from pathlib import Path

from .errors import SpikeLMError

DEFAULT_CHUNK = 512  # tokens per forward of the recurrent evaluation (memory, not the result, depends on it)
DEFAULT_ENERGY_TOKENS = 2048


# ================================================================ the text


def read_text(path) -> str:
    path = Path(path)
    if not path.is_file():
        raise SpikeLMError(f"no text file at {path}: pass --data a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise SpikeLMError(f"{path} is not UTF-8 text ({error})") from None
    if not text.strip():
        raise SpikeLMError(f"{path} has no text in it")
    return text


def encode(tokenizer, text):
    """-> (ids with the start token in front when there is one, whether the first text token is predicted)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        return ids, False
    return [start] + ids, True


def is_spikelm(model) -> bool:
    # compare the type name: under trust_remote_code the config class is a different class object
    return getattr(model.config, "model_type", None) == "spikelm"


# ================================================================ negative log-likelihood


def _nll(logits, targets):
    """Summed cross-entropy in nats. logits [n, V], targets [n]."""
    import torch
    import torch.nn.functional as F

    if logits.dtype != torch.float64:
        logits = logits.float()  # half-precision logits are summed in float32
    return F.cross_entropy(logits, targets, reduction="sum").item()


def recurrent_nll(model, ids, chunk=DEFAULT_CHUNK):
    """Total nats of ids[1:] given what precedes each, reading `chunk` tokens per call with the state carried.
    -> (total nats, predicted tokens)."""
    import torch

    ids = torch.as_tensor(ids, device=model.device)
    total, cache, previous_last = 0.0, None, None  # previous_last: the last logits of the previous chunk
    with torch.no_grad():
        for start in range(0, len(ids), chunk):
            part = ids[start:start + chunk]
            output = model(part[None], cache=cache, use_cache=True)
            cache, logits = output.cache, output.logits[0]  # logits [n, V]
            if previous_last is not None:  # the boundary: the previous chunk's last position predicts part[0]
                total += _nll(previous_last[None], part[:1])
            total += _nll(logits[:-1], part[1:])
            previous_last = logits[-1]
    return total, len(ids) - 1


def sliding_window_nll(model, ids, max_length, stride):
    """The usual evaluation of a model with a context window (as in Hugging Face's perplexity guide): the
    first window scores its first `max_length` tokens; each later window ends `stride` tokens further on
    and scores only those, with the rest of its `max_length` tokens as context (at least max_length - stride).
    -> (total nats, predicted tokens)."""
    import torch

    if not 0 < stride < max_length:
        raise SpikeLMError(f"the stride ({stride}) must be at least 1 and less than the window ({max_length}), "
                           f"so that every scored token has context")
    ids = torch.as_tensor(ids, device=model.device)
    total, scored = 0.0, 1  # ids[0] is never predicted; ids[:scored] are done
    with torch.no_grad():
        while scored < len(ids):
            end = min(len(ids), max(max_length, scored + stride))
            begin = max(0, end - max_length)
            logits = model(ids[None, begin:end], use_cache=False).logits[0]  # logits[i] predicts ids[begin + i + 1]
            total += _nll(logits[scored - begin - 1:end - begin - 1], ids[scored:end])
            scored = end
    return total, len(ids) - 1


def context_length(model):
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(model.config, name, None):
            return int(getattr(model.config, name))
    raise SpikeLMError("the model's config names no context length: pass --max-length")


def perplexity(model, tokenizer, text, chunk=DEFAULT_CHUNK, max_length=None, stride=None, mode="auto"):
    """Perplexity and bits per byte of `text` (see the module docstring for what is counted)."""
    ids, first_predicted = encode(tokenizer, text)
    if len(ids) < 2:
        raise SpikeLMError("the text is too short: it needs at least two tokens")
    mode = ("recurrent" if is_spikelm(model) else "window") if mode == "auto" else mode
    if mode == "recurrent":
        if not is_spikelm(model):
            raise SpikeLMError("--mode recurrent needs a spikelm model; others get --mode window")
        nats, predicted = recurrent_nll(model, ids, chunk)
        how = {"mode": "recurrent", "chunk": chunk}
    else:
        max_length = max_length or context_length(model)
        stride = stride or max(1, max_length // 2)
        nats, predicted = sliding_window_nll(model, ids, max_length, stride)
        how = {"mode": "window", "max_length": max_length, "stride": stride}
    text_bytes = len(text.encode("utf-8"))
    return {
        "perplexity": math.exp(nats / predicted),
        "bits_per_byte": nats / math.log(2) / text_bytes,
        "nats_per_token": nats / predicted,
        "total_nats": nats,
        "predicted_tokens": predicted,
        "text_bytes": text_bytes,
        "text_characters": len(text),
        "first_token_predicted": first_predicted,
        "model_type": model.config.model_type,
        **how,
    }


# ================================================================ energy


def energy_evaluation(model, tokenizer, text, tokens=DEFAULT_ENERGY_TOKENS, chunk=DEFAULT_CHUNK, e_ac=None,
                      e_mac=None, precision="fp32", prices=None):
    """The energy report of a spikelm model reading the first `tokens` tokens of `text` (in chunks, the state
    carried), with the references (GPT-2 fp32 and int8, the ANN twin) doing the same work. Adds spikes per
    token per layer and the fp32 GPT-2's own per-layer figures to spikelm.energy's report.
    precision / prices: see spikelm.energy.Prices; e_ac / e_mac override the operation prices."""
    import torch

    from .energy import count_inference, gpt2_reference_counts

    if not is_spikelm(model):
        raise SpikeLMError(f"the energy report counts spikes: {model.config.model_type!r} is not a spikelm model")
    ids = torch.as_tensor(encode(tokenizer, text)[0][:tokens], device=model.device)
    cache = None
    with count_inference(model) as counter:
        for start in range(0, len(ids), chunk):
            cache = model(ids[None, start:start + chunk], cache=cache, use_cache=True).cache
    config = model.config
    n = counter.tokens
    report = counter.report(e_ac, e_mac, precision, prices)
    report["spikes_per_token_per_layer"] = {layer: counter.spikes[layer] / n for layer in
                                            report["firing_rate_per_layer"]}
    # GPT-2 per token: each layer's share of the weights, attention and its two norms; the head and the last norm
    total = counter.total()
    reference = gpt2_reference_counts(config, n, logits=total.logits, context=total.context)
    layers = config.num_hidden_layers
    e_gpt2 = report["references"]["gpt2_fp32"]["compute_pj"] / report["references"]["gpt2_fp32"]["mac"] if \
        report["references"]["gpt2_fp32"]["mac"] else 0.0  # pJ per MAC-equivalent (its few ACs included)
    norm_share = reference["norms"] / (2 * layers + 1)
    per_layer_mac = (reference["weights"] + reference["attention"] + 2 * layers * norm_share) / layers / n
    head_mac = (reference["head"] + norm_share) / n
    report["ann_per_layer"] = {**{f"layers.{i}": {"mac": per_layer_mac, "pj": e_gpt2 * per_layer_mac}
                                  for i in range(layers)},
                               "head": {"mac": head_mac, "pj": e_gpt2 * head_mac}}
    report["config"] = {"hidden_size": config.hidden_size, "num_hidden_layers": layers,
                        "num_attention_heads": config.num_attention_heads, "time_steps": config.time_steps,
                        "attention_type": config.attention_type, "vocab_size": config.vocab_size,
                        "intermediate_size": config.intermediate_size, "context": n}
    return report
