"""Files shipped with the package: the bundled demo model."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

DEMO_MODEL = "demo_facts"


def default_model_path() -> Path:
    """The bundled demo checkpoint (see docs/demo-model.md)."""
    return Path(str(files("patchserve") / "assets" / DEMO_MODEL))
