"""The results table of issue 4: GPT-2, spikelm from scratch, distilled, ANN twin, converted, converted and
distilled, on the bundled corpus at an equal step budget (JSON and Markdown in --output).

    python eval/distillation_table.py --preset small --steps 300 --output runs/distillation
"""

import sys

from spikelm.comparison import main

if __name__ == "__main__":
    sys.exit(main())
