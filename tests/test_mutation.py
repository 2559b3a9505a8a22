"""The mutation check (scripts/mutation.py, issue 26): its mutator here, fast; the whole
check as a `long` test (`make test-long`), which fails when a listed module's survival
rate after equivalents is above 5 %."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("mutation", ROOT / "scripts" / "mutation.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutation"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_listed_module_has_mutants_that_parse_and_differ():
    tool = _tool()
    for module, selection in tool.SELECTIONS.items():
        assert selection and all((ROOT / s.split("::")[0]).exists() for s in selection), module
        original = ast.unparse(ast.parse((ROOT / "src/patchserve" / module).read_text()))
        mutants = tool.mutants(module)
        assert len(mutants) >= 20, module
        assert len({m.id for m in mutants}) == len(mutants)
        for mutant in mutants:
            assert mutant.source != original
            ast.parse(mutant.source)
    for ident in tool.EQUIVALENT:  # every listed equivalent is a mutant the tool makes
        module = ident.split(":")[0]
        assert ident in {m.id for m in tool.mutants(module)}, ident


def test_the_mutator_makes_the_documented_kinds():
    tool = _tool()
    kinds = {m.id.split(":")[3].split("#")[0].split("~")[0] for m in tool.mutants("text/spans.py")}
    for kind in ("Add->Sub", "Lt->LtE", "And->Or", "drop-Not", "0->1", "return-None"):
        assert kind in kinds
    assert {"drop-raise", "drop-statement", "negate-condition"} <= kinds


@pytest.mark.long
def test_mutation_check_keeps_survivors_within_five_percent(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "mutation.py"), "--json", str(tmp_path / "m.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=4 * 3600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
