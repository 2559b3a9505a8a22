"""``python -m patchserve``: the same command line as ``patchserve``."""

import sys

from patchserve.cli.main import main

sys.exit(main())
