"""Render docs/results.md from the JSON that `spikelm bench` and `spikelm eval` wrote (no measuring).

    python eval/results_page.py --bench runs/bench.json --energy runs/energy.json \
        --perplexity runs/ppl_spikelm.json runs/ppl_gpt2.json --output docs/results.md

The energy plot (the PNG beside the energy JSON) is copied next to the page, as <page>_energy.png.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

from spikelm.reporting import results_page


def load(path):
    return json.loads(Path(path).read_text()) if path else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", default=None, help="JSON written by `spikelm bench`")
    parser.add_argument("--energy", default=None, help="JSON written by `spikelm eval energy`")
    parser.add_argument("--perplexity", nargs="*", default=[], help="JSON files of `spikelm eval perplexity --output`")
    parser.add_argument("--note", default=None, help="a paragraph under the title (machine, conditions)")
    parser.add_argument("--output", default="docs/results.md")
    args = parser.parse_args()
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    plot = None
    if args.energy and Path(args.energy).with_suffix(".png").exists():
        plot = output.parent / f"{output.stem}_energy.png"  # beside the page (docs/energy.png is the README's)
        shutil.copyfile(Path(args.energy).with_suffix(".png"), plot)
    output.write_text(results_page(load(args.bench), load(args.energy), [load(p) for p in args.perplexity],
                                  plot.name if plot else None, args.note))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
