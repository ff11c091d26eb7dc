"""Continue a prompt and count the energy each token cost (`spikelm generate`).

The counts come from spikelm.energy.count_energy around `generate()` (prompt and decode steps, with the
recurrent state); the reference is a same-shape GPT-2 with a KV cache processing the same tokens.
"""


def generate_with_energy(model, tokenizer, prompt: str, max_new_tokens=100, temperature=0.8, top_k=50,
                         top_p=1.0, greedy=False):
    """-> (text: prompt + continuation, energy report per token of the whole generation)."""
    import torch

    from .energy import count_inference

    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or [tokenizer.bos_token_id]
    input_ids = torch.tensor([prompt_ids], device=model.device)
    sampling = {} if greedy else dict(temperature=temperature, top_k=top_k, top_p=top_p)
    with count_inference(model) as counter:
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                                do_sample=not greedy, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id, **sampling)
    report = counter.report()  # with the same-shape GPT-2 doing the same work
    text = tokenizer.decode(output[0], skip_special_tokens=True)
    return text, report
