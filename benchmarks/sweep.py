"""The sweep benchmark (same as ``patchserve bench``); see src/patchserve/bench/sweep.py."""

import sys

from patchserve.bench.sweep import main

if __name__ == "__main__":
    sys.exit(main())
