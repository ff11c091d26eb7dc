"""spikelm against a same-shape GPT-2 (training, prefill, decode, memory, neuron, energy): `spikelm bench`.

    python eval/bench.py --output runs/bench.json       # or --quick
"""

import sys

from spikelm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
