#!/bin/sh
# The container's entry: serve the model named by SPIKELM_MODEL on all interfaces (so that `docker run -p`
# reaches it), port SPIKELM_PORT. Extra arguments go to `spikelm serve` (e.g. --max-batch 16 --threads 2).
# exec: signals (docker stop) reach the server, which shuts down gracefully.
set -eu
exec spikelm serve --model "${SPIKELM_MODEL}" --host 0.0.0.0 --port "${SPIKELM_PORT:-8000}" "$@"
