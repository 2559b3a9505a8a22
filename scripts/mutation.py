"""A scripted mutation check over the modules whose results a user reads (issue 26, item 2).

For each listed module it generates mutants from the module's AST — operator swaps
(arithmetic, comparison, ``and``/``or``), constants off by one, negations dropped or
added, ``return`` values dropped, side-effect statements and ``raise`` dropped —
applies each one *alone* to a scratch copy of ``src/`` (never the working tree), runs
that module's fixed, fast test selection (``pytest -x -q``) against it and records
``killed`` / ``survived`` / ``timeout`` (a timeout counts as killed: the tests did not
pass). Survivors must be killed by a test or listed as equivalent in
``docs/reliability.md``; ``EQUIVALENT`` below holds that list (by mutant id), so a
run reports the survival rate after equivalents.

Why a script and not ``mutmut``: mutmut is not in the project's environment, and it
mutates the source tree in place and starts a fresh test command (a fresh ``import
torch``) per mutant; a small AST mutator is enough for nine modules, keeps the mutant
ids stable and readable (``module:line:col:operator``), and lets each run reuse one
pre-imported interpreter:
the parent imports torch / transformers / pytest once and forks a child per mutant, so
a mutant costs its tests, not a fresh ``import torch``. The tiny test checkpoints are
built once per check and linked into each child's pytest temp dir.

Usage (from the repository root)::

    python scripts/mutation.py                      # every module, table on stdout
    python scripts/mutation.py --module text/spans.py --module engine/noise.py
    python scripts/mutation.py --list text/spans.py # the mutants only, no tests
    python scripts/mutation.py --json out.json      # also the per-mutant results
    python scripts/mutation.py --table a.json b.json  # merge runs (b's outcomes win)

Exit status 1 when a module's survival rate after equivalents exceeds ``--max-survival``
(5 % by default). ``make test-long`` runs it (``tests/test_mutation.py``, marked long).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "patchserve"

#: Module (under src/patchserve) -> the fast test selection that exercises it.
SELECTIONS: dict[str, list[str]] = {
    "wire/metrics.py": ["tests/engine/test_metrics_values.py", "tests/engine/test_metrics.py"],
    "engine/metrics.py": ["tests/engine/test_metrics_values.py", "tests/engine/test_metrics.py"],
    "engine/noise.py": [
        "tests/engine/test_noise_values.py",
        "tests/engine/test_noise_window.py::test_noise_cells_are_sample_means_of_naive_forwards[gpt2]",
        "tests/engine/test_noise_window.py::test_noise_cells_are_sample_means_of_naive_forwards[gemma2]",
        "tests/engine/test_noise_window.py::test_noise_is_deterministic_for_a_seed_and_differs_across_seeds[gpt2]",
    ],
    "engine/report.py": ["tests/engine/test_report_values.py"],
    "engine/continuation.py": [
        "tests/engine/test_continuation_values.py",
        "tests/engine/test_sweep_answers_heads.py::test_multi_token_cells_match_naive_totals[gpt2-none]",
        "tests/engine/test_sweep_answers_heads.py::test_multi_token_cells_match_naive_totals[gpt2-one-lane]",
        "tests/engine/test_sweep_answers_heads.py::test_multi_token_cells_match_naive_totals[gpt2-two-lanes]",
        "tests/engine/test_sweep_answers_heads.py::test_answer_score_is_the_sum_of_plain_per_step_logprobs[gpt2]",
        "tests/engine/test_sweep_answers_heads.py::test_bad_answers_and_head_options_are_refused[gpt2]",
    ],
    "text/alignment.py": ["tests/text/test_alignment_edges.py", "tests/text/test_alignment.py"],
    "text/spans.py": ["tests/text/test_spans_edges.py", "tests/text/test_spans.py"],
    # In-process app first; then the loopback server's own checks (one server per run).
    "server/routes/sources.py": [
        "tests/server/test_sources_values.py",
        "tests/server/test_sources_api.py::test_capture_returns_manifest_top_logprobs_and_grading",
        "tests/server/test_sources_api.py::test_activations_round_trip_exactly",
        "tests/server/test_sources_api.py::test_bad_capture_requests",
    ],
    "server/modules.py": ["tests/server/test_modules_registry.py"],
}

#: Surviving mutants that cannot change any result, by id, with why (docs/reliability.md).
EQUIVALENT: dict[str, str] = {
    "wire/metrics.py:53:62:drop-USub": (
        "`kl_divergence` sums rows of `[n, vocab]` (its contract; the client passes `[1, vocab]`):"
        " `.sum(1)` is `.sum(-1)` there"
    ),
    "wire/metrics.py:99:8:return-None": (
        "the base `has_clean_distribution` is only read as `not ...()`: None and False agree"
    ),
    "wire/metrics.py:121:19:And->Or": (
        "an `assert` for the type checker: `__post_init__` already refused a `recovered` grading"
        " without both baselines, so both are set and `and`/`or` agree"
    ),
    "engine/metrics.py:27:41:drop-USub": (
        "`raw_score` takes `[n, vocab]` logits (every caller adds the row axis):"
        " `log_softmax(dim=1)` is `dim=-1` there"
    ),
    "engine/metrics.py:49:12:And->Or": (
        "only changes `recovered` with a foil, which then also computes log p(answer) — and"
        " ignores it (`Grading.raw` takes the logit difference when there is a foil): work, not"
        " a value"
    ),
    "engine/metrics.py:51:49:drop-USub": "the grader's logits are `[n, vocab]`: dim 1 is dim -1",
    "engine/metrics.py:57:91:drop-USub": "the KL terms are `[n, vocab]`: `.sum(1)` is `.sum(-1)`",
    "engine/noise.py:70:62:0->1": (
        "`device_of(1)` for `device_of(0)`: the same device unless layers 0 and 1 sit on"
        " different GPUs (a device map), where the add would raise, not mis-compute; every"
        " machine this check runs on has one device"
    ),
    "engine/noise.py:137:35:0->1": (
        "`o.stats.get(k, 0)`: every sample's outcome comes from `run_sweep`, whose stats always"
        " hold `computed`, `free` and `batches`, so the default is never read"
    ),
    "engine/continuation.py:67:93:1->2": (
        "the gather index expanded to 2 columns holds the same token twice; `[..., 0]` reads"
        " the first, the same value"
    ),
    "engine/continuation.py:68:46:drop-USub": (
        "`[..., 0]` leaves `[n, tokens]`: `.sum(1)` is `.sum(-1)`"
    ),
    "engine/report.py:41:62:True->False": (
        "`zip(values, ids, strict=False)`: `topk` answers as many values as indices, so the"
        " strict check never fires"
    ),
    "server/routes/sources.py:45:12:drop-raise": (
        "unreachable over HTTP: both callers (`/v1/patch_source`, a completion's `capture`)"
        " type `hooks` as `HookName` = `Literal[HOOKS]` and `INJECTABLE_HOOKS == HOOKS`, so an"
        " unknown hook is the request model's 400 before this line"
    ),
    "server/routes/sources.py:64:8:drop-raise": (
        "the store's `put` refuses an existing name without `overwrite` with the same 409 on"
        " `run`; the early check only spares the forward"
    ),
    "server/routes/sources.py:80:20:Or->And": (
        "right after `put`, the store's manifest of the run is `run.manifest()` (a fresh run"
        " has no lease), so returning the latter changes nothing"
    ),
    "server/routes/sources.py:83:4:drop-statement": (
        "the gauges are read only through `/metrics`, which refreshes them before answering"
    ),
    "server/routes/sources.py:193:4:drop-statement": (
        "as after a capture: `/metrics` refreshes the gauges before answering"
    ),
    "server/routes/sources.py:97:8:return-None": (
        "`capture_run(positions=None)` keeps every position: the same as `all_prompt`'s list"
    ),
    "engine/continuation.py:30:72:1->2": (
        "`_serves`' length clause is implied by its first (equal lists have equal lengths), so"
        " weakening it to `len(seq) - 2` changes nothing"
    ),
    "engine/continuation.py:48:26:1->2": (
        "`_serves(foil[:-2], answer)` is only reached when the answer's tail does not serve the"
        " foil; then the foil is longer than the answer and `foil[:-2]` still holds"
        " `answer[:-1]`, so the decision (and the lane, `foil[:-1]`) is the same"
    ),
}

#: Third-party imports the parent loads once so that each forked child skips them.
PRELOAD = [
    "numpy",
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "pydantic",
    "fastapi",
    "httpx",
    "hypothesis",
    "pytest",
]

BINOP_SWAPS: dict[type, type] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div,
    ast.Mod: ast.FloorDiv,
    ast.Pow: ast.Mult,
}
COMPARE_SWAPS: dict[type, type] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}


@dataclass(frozen=True)
class Mutant:
    id: str  # "module:line:col:operator"
    module: str
    line: int
    description: str
    source: str  # the whole mutated module


@dataclass
class Result:
    id: str
    module: str
    line: int
    description: str
    outcome: str  # killed | survived | timeout
    seconds: float


def _skipped_fields(node: ast.AST) -> set[str]:
    """Fields never mutated: annotations (types only), decorators' and defaults' shapes stay."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return {"returns", "decorator_list"}
    if isinstance(node, ast.arg):
        return {"annotation"}
    if isinstance(node, ast.AnnAssign):
        return {"annotation"}
    if isinstance(node, ast.ClassDef):
        return {"decorator_list"}
    return set()


def _walk(node: ast.AST, path: tuple[tuple[str, int | None], ...] = ()) -> Iterator[tuple]:
    """(node, path) for every node that may be mutated (no docstrings, f-strings, types,
    imports, ``__all__``)."""
    yield node, path
    if isinstance(node, (ast.JoinedStr, ast.Import, ast.ImportFrom)):
        return
    if isinstance(node, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
    ):
        return
    skipped = _skipped_fields(node)
    for field, value in ast.iter_fields(node):
        if field in skipped:
            continue
        if isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, ast.AST):
                    yield from _walk(item, (*path, (field, i)))
        elif isinstance(value, ast.AST):
            yield from _walk(value, (*path, (field, None)))


def _resolve(tree: ast.AST, path: tuple[tuple[str, int | None], ...]) -> ast.AST:
    node = tree
    for field, index in path:
        value = getattr(node, field)
        node = value[index] if index is not None else value
    return node


def _is_docstring(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


def _is_none(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def _edits(node: ast.AST) -> Iterator[tuple[str, object]]:
    """(operator name, edit) pairs for one node; an edit is applied to a copy of the node."""
    if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in BINOP_SWAPS:
        new = BINOP_SWAPS[type(node.op)]
        yield f"{type(node.op).__name__}->{new.__name__}", ("op", new)
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in COMPARE_SWAPS:
                new = COMPARE_SWAPS[type(op)]
                yield f"{type(op).__name__}->{new.__name__}#{i}", ("cmp", i, new)
    if isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        yield f"{type(node.op).__name__}->{new.__name__}", ("op", new)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        yield f"drop-{type(node.op).__name__}", ("unwrap",)
    if isinstance(node, ast.Constant) and not isinstance(node.value, str):
        value = node.value
        if isinstance(value, bool):
            yield f"{value}->{not value}", ("const", not value)
        elif isinstance(value, int):
            yield f"{value}->{value + 1}", ("const", value + 1)
        elif isinstance(value, float):
            yield f"{value!r}->{value * 2 + 1!r}", ("const", value * 2 + 1)
    if isinstance(node, (ast.If, ast.IfExp, ast.While)):
        yield "negate-condition", ("negate",)
    if isinstance(node, ast.Return) and node.value is not None and not _is_none(node.value):
        yield "return-None", ("return-none",)
    if isinstance(node, ast.Raise):
        yield "drop-raise", ("pass",)
    if isinstance(node, ast.Expr) and not _is_docstring(node):
        yield "drop-statement", ("pass",)
    if isinstance(node, ast.AugAssign):
        yield "drop-statement", ("pass",)
    if isinstance(node, ast.Assign) and any(
        isinstance(t, (ast.Attribute, ast.Subscript)) for t in node.targets
    ):
        yield "drop-statement", ("pass",)


def _mutated_source(tree: ast.Module, path: tuple, edit: tuple) -> str:
    """The module's source with one edit applied (in place, undone before returning)."""
    node = _resolve(tree, path)
    kind = edit[0]
    owner, field, index = node, "", None
    new: object
    if kind == "op":
        field, new = "op", edit[1]()
    elif kind == "cmp":
        field, index, new = "ops", edit[1], edit[2]()
    elif kind == "const":
        field, new = "value", edit[1]
    elif kind == "negate":
        field, new = "test", ast.UnaryOp(op=ast.Not(), operand=node.test)  # type: ignore[attr-defined]
    elif kind == "return-none":
        field, new = "value", ast.Constant(value=None)
    else:  # "unwrap" (the operand replaces the operation) or "pass" (the statement goes)
        new = node.operand if kind == "unwrap" else ast.Pass()  # type: ignore[attr-defined]
        owner, (field, index) = _resolve(tree, path[:-1]), path[-1]
    container = getattr(owner, field) if index is not None else owner
    key = index if index is not None else field
    old = container[key] if index is not None else getattr(owner, field)
    try:
        if index is not None:
            container[key] = new
        else:
            setattr(owner, field, new)
        return ast.unparse(tree)
    finally:
        if index is not None:
            container[key] = old
        else:
            setattr(owner, field, old)


def mutants(module: str) -> list[Mutant]:
    """Every mutant of ``module`` (a path under src/patchserve), in source order."""
    text = (PACKAGE / module).read_text()
    tree = ast.parse(text)
    out: list[Mutant] = []
    seen: set[str] = set()
    ids: set[str] = set()
    for node, path in _walk(tree):
        for name, edit in _edits(node):
            line, col = getattr(node, "lineno", 0), getattr(node, "col_offset", 0)
            mutated = _mutated_source(tree, path, edit)
            if mutated in seen:
                continue
            seen.add(mutated)
            segment = ast.get_source_segment(text, node) or type(node).__name__
            segment = " ".join(segment.split())
            if len(segment) > 60:
                segment = segment[:57] + "..."
            ident = f"{module}:{line}:{col}:{name}"
            if ident in ids:  # nested nodes may share a position: number the repeats
                ident = f"{ident}~{sum(i.startswith(ident) for i in ids) + 1}"
            ids.add(ident)
            out.append(Mutant(ident, module, line, f"{name}: {segment}", mutated))
    return out


# -- running ---------------------------------------------------------------------------------


def _scratch() -> Path:
    """A scratch copy of src/ (no bytecode) that every child imports from."""
    folder = Path(tempfile.mkdtemp(prefix="patchserve-mutation-"))
    shutil.copytree(SRC, folder / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return folder


def _cache_checkpoints(cache: Path) -> None:
    """Make tests/checkpoints.py's ``build_checkpoint`` build each family once per check and
    link it into the requesting test's root (the children inherit the patched module)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import checkpoints

    build = checkpoints.build_checkpoint

    def cached(family: str, root: Path, seed: int = 0) -> Path:
        folder = Path(root) / family
        if (folder / "config.json").exists():
            return folder
        built = build(family, cache / f"seed{seed}", seed)
        folder.parent.mkdir(parents=True, exist_ok=True)
        if not folder.exists():
            folder.symlink_to(built, target_is_directory=True)
        return folder

    checkpoints.build_checkpoint = cached  # type: ignore[assignment]


WRONG_IMPORT = 99


def _run_child(scratch: Path, selection: list[str], quiet: bool) -> int:
    """In a forked child: import patchserve from the scratch copy and run the selection."""
    os.chdir(ROOT)
    sys.dont_write_bytecode = True
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    src = str(scratch / "src")
    os.environ["PYTHONPATH"] = os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])
    sys.path.insert(0, src)
    if quiet:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    import pytest

    args = ["-x", "-q", "-p", "no:cacheprovider", *selection]
    code = int(pytest.main(args))
    imported = getattr(sys.modules.get("patchserve"), "__file__", "") or ""
    if not imported.startswith(src):  # the tests must have run against the scratch copy
        return WRONG_IMPORT
    return code


def run_selection(scratch: Path, selection: list[str], timeout: float, quiet: bool = True) -> str:
    """``passed`` / ``failed`` / ``timeout`` of the selection against the scratch copy."""
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        code = 1
        try:
            code = _run_child(scratch, selection, quiet)
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            if code == WRONG_IMPORT:
                raise SystemExit("the tests imported patchserve from outside the scratch copy")
            return "passed" if code == 0 else "failed"
        if time.monotonic() > deadline:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, sig)  # the child and any server it started
                time.sleep(1)
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.05)


def check_module(
    module: str,
    scratch: Path,
    results: list[Result],
    only: set[str] | None,
    log: bool,
    verbose: bool = False,
) -> None:
    target = scratch / "src" / "patchserve" / module
    original = target.read_text()
    selection = [s for s in SELECTIONS[module] if (ROOT / s.split("::")[0]).exists()]
    if not selection:  # never fall back to pytest's default (the whole suite)
        raise SystemExit(f"{module}: none of its test files exists: {SELECTIONS[module]}")
    start = time.monotonic()
    baseline = run_selection(scratch, selection, timeout=1800, quiet=not log)
    base_seconds = time.monotonic() - start
    if baseline != "passed":
        raise SystemExit(f"{module}: the selection fails on the unmutated code ({baseline})")
    timeout = 3 * base_seconds + 20
    print(f"# {module}: baseline {base_seconds:.1f}s, timeout {timeout:.0f}s", flush=True)
    try:
        for mutant in mutants(module):
            if only is not None and mutant.id not in only:
                continue
            target.write_text(mutant.source)
            t0 = time.monotonic()
            status = run_selection(scratch, selection, timeout)
            outcome = {"passed": "survived", "failed": "killed", "timeout": "timeout"}[status]
            result = Result(
                mutant.id,
                module,
                mutant.line,
                mutant.description,
                outcome,
                round(time.monotonic() - t0, 2),
            )
            results.append(result)
            if outcome == "survived" or verbose:
                mark = "equivalent" if mutant.id in EQUIVALENT else outcome.upper()
                print(f"  {mark:10} {mutant.id}  {mutant.description}", flush=True)
    finally:
        target.write_text(original)


def summary(results: list[Result], modules: list[str]) -> tuple[list[str], bool]:
    """A markdown table (killed / survived / equivalent / survival rate) and whether every
    module is within the limit."""
    lines = [
        "| module | mutants | killed | timeout | survived | equivalent "
        "| survival after equivalents |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    ok = True
    for module in modules:
        own = [r for r in results if r.module == module]
        killed = sum(r.outcome == "killed" for r in own)
        timeouts = sum(r.outcome == "timeout" for r in own)
        survived = [r for r in own if r.outcome == "survived"]
        equivalent = sum(r.id in EQUIVALENT for r in survived)
        live = len(survived) - equivalent
        denominator = len(own) - equivalent
        rate = live / denominator if denominator else 0.0
        ok = ok and rate <= ARGS_MAX_SURVIVAL[0]
        lines.append(
            f"| `{module}` | {len(own)} | {killed} | {timeouts} | {live} | {equivalent} "
            f"| {100 * rate:.1f} % |"
        )
    return lines, ok


ARGS_MAX_SURVIVAL = [0.05]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", choices=sorted(SELECTIONS))
    parser.add_argument("--list", metavar="MODULE", help="print a module's mutants and exit")
    parser.add_argument("--only", action="append", help="run only this mutant id (repeatable)")
    parser.add_argument("--json", type=Path, help="write the per-mutant results here")
    parser.add_argument("--max-survival", type=float, default=0.05)
    parser.add_argument("--log", action="store_true", help="show the baseline runs' output")
    parser.add_argument("--verbose", action="store_true", help="print every mutant's outcome")
    parser.add_argument("--nice", type=int, default=10, help="run at least this nice (shared CPUs)")
    parser.add_argument(
        "--table",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="print the table of earlier --json results (a later file's result of a mutant "
        "replaces an earlier one's: a full run, then a rerun of its survivors) and exit",
    )
    args = parser.parse_args(argv)
    ARGS_MAX_SURVIVAL[0] = args.max_survival
    if args.table:
        merged: dict[str, Result] = {}
        for path in args.table:
            for item in json.loads(path.read_text()):
                merged[item["id"]] = Result(**item)
        found = list(merged.values())
        lines, ok = summary(found, [m for m in SELECTIONS if any(r.module == m for r in found)])
        print("\n".join(lines))
        for r in found:
            if r.outcome == "survived":
                print(f"- `{r.id}` ({r.description}): {EQUIVALENT.get(r.id, 'NOT EQUIVALENT')}")
        return 0 if ok else 1
    if args.list:
        for mutant in mutants(args.list):
            print(mutant.id, "|", mutant.description)
        return 0
    modules = args.module or list(SELECTIONS)
    os.nice(max(0, args.nice - os.nice(0)))  # at least this nice (`nice -n 10 ...` adds none)
    for name in PRELOAD:
        __import__(name)
    scratch = _scratch()
    _cache_checkpoints(scratch / "checkpoints")
    results: list[Result] = []
    only = set(args.only) if args.only else None
    try:
        for module in modules:
            check_module(module, scratch, results, only, args.log, args.verbose)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if args.json:
            args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    lines, ok = summary(results, modules)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
