#!/usr/bin/env bash
# The README's first command: on a fresh machine, install spikelm, train the `small` preset on the bundled
# corpus (Tiny Shakespeare), generate a sample and print its energy per token. Under 15 minutes on 2 CPU cores,
# installation included (2 min 46 s measured on 2026-12-02 with pip's cache, 4 min 01 s to 4 min 06 s earlier that
# day before faster kernels, 14 min while other jobs shared the cores).
#   bash train/quickstart.sh                  # makes .venv
#   VENV=/path/to/venv bash train/quickstart.sh   # use an existing environment (skips the installation)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VENV:-}" ]; then
    VENV=.venv
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0  # first and pinned: an unpinned torch pulls a CUDA build
    "$VENV/bin/pip" install -q -e .
fi
. "$VENV/bin/activate"
export HF_HUB_OFFLINE=1  # everything is local
spikelm train --preset small --output runs/quickstart --max-steps 500 --eval-steps 200 --save-steps 250
spikelm generate --model runs/quickstart --prompt "ROMEO:" --max-new-tokens 200
