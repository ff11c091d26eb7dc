"""`spikelm generate`: continue a prompt with a saved model and print the energy each token cost.

    spikelm generate --model runs/small --prompt "ROMEO:" --max-new-tokens 100
"""

import json

from ..errors import SpikeLMError


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="a directory written by `spikelm train` (or save_pretrained), "
                                                       "or a hub id")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of a hub id")
    parser.add_argument("--prompt", default="", help="text to continue (default: start from nothing)")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--greedy", action="store_true", help="always the most likely token (no sampling)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object: text and energy report")


def run(args) -> int:
    from ..loading import load_model_and_tokenizer, require_saved_model

    require_saved_model(args.model, revision=args.revision)
    if args.max_new_tokens < 1:
        raise SpikeLMError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    from transformers import set_seed

    from ..generation import generate_with_energy

    set_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model, revision=args.revision)
    text, report = generate_with_energy(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                                        args.top_k, args.top_p, args.greedy)
    if args.json:
        print(json.dumps({"text": text, "energy": {k: v for k, v in report.items() if k != "rows"}}))
        return 0
    print(text)
    from ..reporting import energy_summary_lines

    print("\n" + energy_summary_lines(report))
    return 0
