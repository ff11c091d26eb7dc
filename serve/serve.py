"""Serve a saved spikelm model over HTTP: the same as `spikelm serve --model DIR [...]`."""

import sys

from spikelm.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
