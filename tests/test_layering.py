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


def absolute(path: Path, node: ast.ImportFrom) -> list[str]:
    """The absolute modules of an ``ImportFrom``; a relative one (``from ..engine import x``,
    ``from . import x``) resolved against the package of ``path``."""
    if node.level == 0:
        return [node.module] if node.module else []
    package = ["patchserve", *path.relative_to(SRC).parent.parts]
    if node.level > 1:
        package = package[: -(node.level - 1)]
    assert package, f"{path}: a relative import above the package"
    base = ".".join(package)
    if node.module:
        return [f"{base}.{node.module}"]
    return [f"{base}.{alias.name}" for alias in node.names]


def imported(path: Path) -> set[str]:
    """Top-level names a module imports: ``patchserve.X`` as ``X``, libraries by name;
    relative imports resolved."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = absolute(path, node)
        for module in modules:
            parts = module.split(".")
            names.add(parts[1] if parts[0] == "patchserve" and len(parts) > 1 else parts[0])
    return names


def test_relative_imports_are_resolved(tmp_path):
    """``from ..engine import x`` in ``server/routes/a.py`` is an import of ``engine``."""
    module = SRC / "server" / "routes" / "a.py"
    node = ast.parse("from ..engine import x\nfrom . import y\nfrom .. import cli\n").body
    assert absolute(module, node[0]) == ["patchserve.server.engine"]
    assert absolute(module, node[1]) == ["patchserve.server.routes.y"]
    assert absolute(module, node[2]) == ["patchserve.server.cli"]
    models = SRC / "models" / "a.py"
    top = ast.parse("from ..engine import run\nfrom ..server import app").body
    assert [absolute(models, n) for n in top] == [["patchserve.engine"], ["patchserve.server"]]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_downwards(package):
    offenders = {
        str(path.relative_to(SRC)): sorted(imported(path) & FORBIDDEN[package])
        for path in (SRC / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}
