"""The import direction of the packages holds: models <- engine <- server/cli; the client
reads only the wire format, text and the shared errors (never torch); wire and text are
leaves that import no runtime."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "patchserve"

# package -> the patchserve packages (and heavy libraries) it must never import
FORBIDDEN = {
    "models": {"engine", "server", "cli", "client", "bench"},
    "engine": {"server", "cli", "client", "bench"},
    "wire": {"models", "engine", "server", "cli", "client", "bench", "torch", "transformers"},
    "text": {"models", "engine", "server", "cli", "client", "bench", "torch"},
    "client": {"models", "engine", "server", "cli", "bench", "torch", "transformers"},
    "server": {"cli", "client", "bench"},
}


def imported(path: Path) -> set[str]:
    """Top-level names a module imports: ``patchserve.X`` as ``X``, libraries by name."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module]
        for module in modules:
            parts = module.split(".")
            names.add(parts[1] if parts[0] == "patchserve" and len(parts) > 1 else parts[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_downwards(package):
    offenders = {
        str(path.relative_to(SRC)): sorted(imported(path) & FORBIDDEN[package])
        for path in (SRC / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}
