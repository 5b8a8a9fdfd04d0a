"""`python -m vggnet` (and `torchrun -m vggnet train ...`) run the command-line tool."""

import sys

from .cli import main

sys.exit(main())
