"""Server settings (the ``patchserve serve`` options)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def default_cache_bytes(fraction: float = 0.25) -> int:
    """A quarter of the memory available now (4 GiB where /proc/meminfo is missing)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(int(line.split()[1]) * 1024 * fraction)
    except OSError:
        pass
    return 4 * 2**30


@dataclass
class ServerConfig:
    model: str | None = None  # None: the bundled demo model
    device: str = "cpu"
    device_map: str | None = None  # auto, balanced or "0:0-13,1:14-27" (models/placement.py)
    dtype: str = "float32"
    api_key: str | None = None
    source_dir: Path | None = None
    source_cache_bytes: int | None = None
    max_batch_tokens: int = 4096
    max_prompt_tokens: int = 2048
    max_cells: int = 200_000
    max_body_bytes: int = 64 * 2**20
    max_prompts: int = 2048  # prompts in one completion request
    served_model_name: str | None = None
    replicas: int = 0  # > 0: sweeps run on this many Ray actors (engine/replicas.py)
    ray_address: str | None = None  # an existing Ray cluster (default: start a local one)
    runtime: str = "auto"  # native | transformers | auto (models/loading.py choose_runtime)
