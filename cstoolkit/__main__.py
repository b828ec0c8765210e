"""``python -m cstoolkit ...`` (also what ``torchrun -m cstoolkit bench ...`` runs)."""

import sys

from .cli import main

sys.exit(main())
