"""Continue a prompt and count the energy each token cost (`spikelm generate`).

The counts come from spikelm.energy.count_energy around `generate()` (prompt and decode steps, with the
recurrent state); the reference is a same-shape GPT-2 with a KV cache processing the same tokens.
"""


def generate_with_energy(model, tokenizer, prompt: str, max_new_tokens=100, temperature=0.8, top_k=50,
                         top_p=1.0, greedy=False):
    """-> (text: prompt + continuation, energy report per token of the whole generation)."""
    import torch

    from .energy import count_energy, gpt2_reference_counts

    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or [tokenizer.bos_token_id]
    input_ids = torch.tensor([prompt_ids], device=model.device)
    sampling = {} if greedy else dict(temperature=temperature, top_k=top_k, top_p=top_p)
    model.eval()
    with torch.no_grad(), count_energy(model) as counter:
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                                do_sample=not greedy, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id, **sampling)
    config = model.config
    reference = gpt2_reference_counts(config.hidden_size, config.num_hidden_layers, config.vocab_size,
                                      counter.tokens, config.intermediate_size)
    report = counter.report(reference_macs=reference["total"])
    text = tokenizer.decode(output[0], skip_special_tokens=True)
    return text, report
