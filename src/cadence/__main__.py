"""``python -m cadence ...`` (and ``torchrun ... -m cadence train ...``)."""

import sys

from cadence.cli import main

sys.exit(main())
