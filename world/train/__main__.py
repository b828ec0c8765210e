"""``python -m cstoolkit.world.train``: the same command line as ``cstoolkit world train``."""

import sys

from . import main

sys.exit(main())
