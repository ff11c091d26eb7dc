"""Perplexity and bits per byte of a saved model on a held-out text: `spikelm eval perplexity`.

    python eval/perplexity.py --model runs/quickstart --data held_out.txt [--json] [--output FILE]
"""

import sys

from spikelm.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "perplexity", *sys.argv[1:]]))
