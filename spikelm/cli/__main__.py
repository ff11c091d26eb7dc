"""`python -m spikelm.cli ...` (and `accelerate launch -m spikelm.cli train ...`): the `spikelm` command."""

import sys

from . import main

sys.exit(main())
