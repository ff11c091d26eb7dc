"""`spikelm generate`: continue a prompt with a saved model and print the energy each token cost.

    spikelm generate --model runs/small --prompt "ROMEO:" --max-new-tokens 100

The counts come from spikelm.energy.count_energy around `generate()` (prompt and decode steps, with the
recurrent state); the reference is a same-shape GPT-2 with a KV cache processing the same tokens.
"""

import json
from pathlib import Path

from .errors import SpikeLMError


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


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="a directory written by `spikelm train` (or save_pretrained)")
    parser.add_argument("--prompt", default="", help="text to continue (default: start from nothing)")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--greedy", action="store_true", help="always the most likely token (no sampling)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object: text and energy report")


def run(args) -> int:
    if not Path(args.model, "config.json").exists():
        raise SpikeLMError(f"no saved model in {args.model}: pass --model a directory written by `spikelm train`")
    if args.max_new_tokens < 1:
        raise SpikeLMError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    from transformers import AutoModelForCausalLM, set_seed

    from .tokenizer import load_tokenizer

    set_seed(args.seed)
    tokenizer = load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    text, report = generate_with_energy(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                                        args.top_k, args.top_p, args.greedy)
    if args.json:
        print(json.dumps({"text": text, "energy": {k: v for k, v in report.items() if k != "rows"}}))
        return 0
    print(text)
    print(f"\nenergy: {report['pj_per_token']:.0f} pJ/token ({report['ac_per_token']:.0f} ACs + "
          f"{report['mac_per_token']:.0f} MACs per token, firing rate {report['firing_rate']:.3f}); "
          f"same-shape GPT-2: {report['ann_pj_per_token']:.0f} pJ/token (x{report['energy_ratio']:.2f})")
    return 0
