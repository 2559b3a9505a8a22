"""The attribution benchmark (same as ``patchserve bench attribution``); see
src/patchserve/bench/attribution.py."""

import sys

from patchserve.bench.attribution import main

if __name__ == "__main__":
    sys.exit(main())
