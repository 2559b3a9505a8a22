"""The sweep engine: captured runs, validated sweep specs, exact and fast execution."""

from patchserve.engine.errors import InvalidArgument, SweepCancelled
from patchserve.engine.metrics import METRICS, Grader
from patchserve.engine.runs import CapturedRun, capture_run, check_run_name
from patchserve.engine.stream import stream_sweep
from patchserve.engine.study import prepare_sweep, zeros_source
from patchserve.engine.sweep import Cell, SweepOutcome, SweepSpec, VectorSource, run_sweep

__all__ = [
    "METRICS",
    "CapturedRun",
    "Cell",
    "Grader",
    "InvalidArgument",
    "SweepCancelled",
    "SweepOutcome",
    "SweepSpec",
    "VectorSource",
    "capture_run",
    "check_run_name",
    "prepare_sweep",
    "run_sweep",
    "stream_sweep",
    "zeros_source",
]
