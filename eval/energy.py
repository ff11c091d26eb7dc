"""Energy report of a saved spikelm model (JSON, Markdown, PNG): `spikelm eval energy`.

    python eval/energy.py --model runs/quickstart --data held_out.txt --output runs/energy.json
"""

import sys

from spikelm.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "energy", *sys.argv[1:]]))
