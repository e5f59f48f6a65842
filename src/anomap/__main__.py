"""``python -m anomap``: the command line (and what ``torchrun -m anomap`` runs)."""

import sys

from anomap.cli import main

sys.exit(main())
