"""Train or fine-tune a spikelm model: the same as the `spikelm train` command, as a script.

    python train/train.py --output runs/small                            # the bundled corpus, `small` preset
    python train/train.py --corpus data.jsonl --output runs/x --preset base --max-steps 20000
    python train/train.py --model runs/small --corpus other.txt --output runs/tuned   # fine-tuning
    accelerate launch --config_file train/accelerate/ddp.yaml train/train.py --output runs/x ...

Every flag: python train/train.py --help. The logic lives in spikelm/training.py.
"""

import sys

from spikelm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
