"""`python -m moeviz.cli` (and `torchrun … -m moeviz.cli`)."""

import sys

from . import main

sys.exit(main())
