"""``patchserve sweep``: a whole study from the shell.

In-process on a model (``--model``, default the bundled demo) or against a
running server (``--url``). A progress bar follows the cells as they are
graded; at the end a coloured heatmap table (layers x tokens) and the top
cells are printed, and optionally a PNG heatmap and the JSON body are saved.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from patchserve.cli.errors import CommandError
from patchserve.cli.trace import add_tracing_arguments, corruption_fields, run_facts
from patchserve.text.spans import Span
from patchserve.wire.hooks import LOWER_IS_BETTER, METRICS
from patchserve.wire.sweep import CellEvent, ErrorEvent, SummaryEvent, SweepBody


def _count(text: str) -> int:
    """An argparse type: a whole number >= 0 (``--top -3`` would silently list all but 3)."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def _int_list(text: str, what: str, negative: bool = False) -> list[int]:
    """``0,2,5`` and inclusive ranges ``2-6``, mixed; with ``negative``, also ``-1`` (counted
    from the end, as the API does)."""
    out: list[int] = []
    for part in text.split(","):
        if re.fullmatch(r"\d+-\d+", part):
            a, b = (int(p) for p in part.split("-"))
            out.extend(range(a, b + 1))
        elif part.isdigit() or (negative and re.fullmatch(r"-\d+", part)):
            out.append(int(part))
        else:
            examples = "3, -1 (the last), 0,2,5" if negative else "3, 0,2,5"
            raise CommandError(f"bad {what} {part!r}: use e.g. {examples} or 2-6 (inclusive)")
    return out


def parse_layers_arg(text: str | None) -> Any:
    """``all`` | ``3`` | ``0,2,5`` | ``2-6`` (inclusive) | ``0:12:2`` (start:stop:step)."""
    if text is None or text == "all":
        return "all"
    if re.fullmatch(r"\d+:\d+(:\d+)?", text):
        parts = [int(p) for p in text.split(":")]
        return {"start": parts[0], "stop": parts[1], "step": parts[2] if len(parts) > 2 else 1}
    return _int_list(text, "layers")


def parse_positions_arg(items: list[str] | None) -> Any:
    """Ints, inclusive ranges ``3-7`` and ``span:TEXT`` (``span:TEXT@2`` for an occurrence)."""
    if not items:
        return "all_prompt"
    out: list[Any] = []
    for item in items:
        if item.startswith("span:"):
            text, _, occurrence = item[len("span:") :].rpartition("@")
            if not text or not occurrence.isdigit():
                text, occurrence = item[len("span:") :], "0"
            out.append(Span(text, int(occurrence)).to_json())
        else:
            out.extend(_int_list(item, "position", negative=True))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clean", help="the clean prompt")
    p.add_argument("--corrupt", help="the corrupt prompt (or --noise SUBJECT)")
    p.add_argument(
        "--answer",
        help="answer, usually with its leading space (default: clean top-1); several tokens "
        "are graded by their total log-probability",
    )
    p.add_argument("--answer-ids", help="the answer as comma-separated token ids (wins)")
    p.add_argument("--foil", help="foil for logit_diff / recovered")
    p.add_argument("--foil-ids", help="the foil as comma-separated token ids (wins)")
    p.add_argument("--layers", default="all", help="all | 3 | 0,2,5 | 2-6 | 0:12:2")
    p.add_argument(
        "--positions",
        nargs="*",
        help="ints (-1 is the last token), ranges 3-7, span:TEXT[@N] (default: every token)",
    )
    p.add_argument("--hooks", default="post_block", help="comma-separated hook names")
    p.add_argument("--heads", help="attn_head: all | 0,2 | 1-3 (default all)")
    p.add_argument(
        "--per-position",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="attn_head: --no-per-position makes one cell per (layer, head), the head patched "
        "at every selected position at once",
    )
    p.add_argument(
        "--metric",
        default="logprob",
        choices=list(METRICS),
        help="what to grade (kl: lower = more restored)",
    )
    p.add_argument(
        "--method",
        default="exact",
        choices=["exact", "attribution", "attribution+verify"],
        help="exact cells, first-order estimates, or estimates with the top cells exact",
    )
    p.add_argument(
        "--verify-top-k", type=int, help="attribution+verify: cells computed exactly (10)"
    )
    p.add_argument("--url", help="a running patchserve server (else in-process)")
    p.add_argument("--api-key", help="API key for --url")
    p.add_argument("--model", help="checkpoint for the in-process run (default: bundled demo)")
    p.add_argument("--device", default="cpu", help="torch device of the in-process run")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weights' dtype",
    )
    p.add_argument("--out", help="write a PNG heatmap here")
    p.add_argument("--json", help="write the response body here")
    p.add_argument("--top", type=_count, default=5, help="how many top cells to list")
    add_tracing_arguments(p)
    # argparse reads "-1" alone as a number, but "-2,-1" as an unknown option: a comma list of
    # numbers is a value too (no option of this command looks like a number).
    p._negative_number_matcher = re.compile(r"^-\d+(,-?\d+)*$|^-\d*\.\d+$")


def _request(args: argparse.Namespace) -> dict[str, Any]:
    hooks = [h.strip() for h in args.hooks.split(",") if h.strip()]
    body: dict[str, Any] = {
        **corruption_fields(args),
        "hooks": hooks,
        "layers": parse_layers_arg(args.layers),
        "positions": parse_positions_arg(args.positions),
        "metric": args.metric,
        "method": args.method,
    }
    if args.verify_top_k is not None:
        body["verify_top_k"] = args.verify_top_k
    if args.answer is not None:
        body["answer_token"] = args.answer
    if args.answer_ids:
        body["answer_token_id"] = _int_list(args.answer_ids, "answer id")
    if args.foil is not None:
        body["foil_token"] = args.foil
    if args.foil_ids:
        body["foil_token_id"] = _int_list(args.foil_ids, "foil id")
    if args.per_position is not None:
        body["per_position"] = args.per_position
    if args.heads:
        heads = args.heads.strip()
        body["heads"] = "all" if heads == "all" else _int_list(heads, "head")
    return body


def _run_in_process(args: argparse.Namespace, body: dict[str, Any], on_cell) -> SweepBody:
    """The study on a model loaded here, through the same study service as the server."""
    from patchserve.cli.main import require_server_extra

    require_server_extra("patchserve sweep without --url")
    import torch

    from patchserve.engine.report import cell_event
    from patchserve.engine.service import Study, StudyResources
    from patchserve.models import load_model
    from patchserve.text.tokenizer import Tokenizer
    from patchserve.wire.errors import validation_message
    from patchserve.wire.requests import PatchSweepRequest

    if args.model is None:
        from patchserve.assets import default_model_path

        args.model = str(default_model_path())
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    torch.set_grad_enabled(False)
    resources = StudyResources(loaded.model, Tokenizer.from_folder(loaded.path), loaded.path.name)
    try:
        request = PatchSweepRequest.model_validate(body)
    except ValidationError as exc:
        raise CommandError(validation_message(exc.errors())[0]) from exc
    study = Study(resources, request)
    return study.run(
        lambda cell, done, total: on_cell(cell_event(cell, done, total, request.method))
    )


def _run_remote(args: argparse.Namespace, body: dict[str, Any], on_cell) -> SweepBody:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        return _stream_remote(args.url, headers, body, on_cell)
    except httpx.TransportError as exc:
        raise CommandError(f"cannot reach {args.url}: {exc}") from exc


def _stream_remote(url: str, headers: dict[str, str], body: dict[str, Any], on_cell) -> SweepBody:
    import httpx

    from patchserve.wire.errors import ErrorBody
    from patchserve.wire.sse import iter_events

    with (
        httpx.Client(base_url=url, timeout=None, headers=headers) as client,
        client.stream("POST", "/v1/patch_sweep", json={**body, "stream": True}) as response,
    ):
        if response.status_code >= 400:
            error = ErrorBody.model_validate_json(response.read()).error
            raise CommandError(f"{response.status_code}: {error.message}")
        for event in iter_events(response):
            if isinstance(event, CellEvent):
                on_cell(event)
            elif isinstance(event, SummaryEvent):
                return SweepBody.model_validate(event.model_dump(exclude={"type"}))
            elif isinstance(event, ErrorEvent):
                raise CommandError(event.error.message)
    raise CommandError("the server closed the stream before the summary")


def _colour(value: float | None, low: float, centre: float, high: float) -> str:
    """The cell's background on the figures' scale: red = more restored, blue = less
    (``kl``, where ``centre`` is NaN: red by how low the value is)."""
    if value is None:
        return "grey30"
    if math.isnan(centre):
        t = max(0.0, min(1.0, (high - value) / max(high - low, 1e-12)))
    else:
        span = max(high - centre, centre - low, 1e-12)
        t = max(-1.0, min(1.0, (value - centre) / span))
    level = int(55 + 200 * abs(t))
    return f"rgb({level},60,60)" if t > 0 else f"rgb(60,60,{level})"


def _grids(result: SweepBody) -> list[tuple[str, list]]:
    if result.hook_grids is not None:
        return [(g.hook, g.grid) for g in result.hook_grids]
    return [(result.hook, result.grid)]


def _print_head_grid(
    console: Console,
    result: SweepBody,
    grid: list,
    bounds: tuple[float, float, float],
    cells: list[tuple[float, str, int, int | None, int | None]],
) -> None:
    """An attn_head grid that is not per position: one row per layer, one column per head."""
    heads = result.heads or []
    table = Table(title=f"attn_head (every position) — {result.metric}", pad_edge=False)
    table.add_column("layer", justify="right")
    for head in heads:
        table.add_column(f"H{head}", justify="center", no_wrap=True)
    for layer, row in zip(result.layers, grid, strict=True):
        texts = []
        for head, value in zip(heads, row, strict=True):
            shown = "  ·  " if value is None else f"{value:5.2f}"
            texts.append(Text(shown, style=f"on {_colour(value, *bounds)}"))
            if value is not None:
                cells.append((value, "attn_head", layer, None, head))
        table.add_row(f"L{layer}", *texts)
    console.print(table)


def print_result(console: Console, result: SweepBody, top: int) -> None:
    from patchserve.client.figures import scale_bounds  # the client: not in `patchserve serve`

    if not console.is_terminal:  # a pipe or a file: do not squeeze the table into 80 columns
        console.width = max(console.width, 16 + 9 * len(result.positions))
    tokens = result.tokens or [str(p) for p in result.positions]
    labels = [tokens[p] if p < len(tokens) else str(p) for p in result.positions]
    every = [np.asarray(grid, dtype=float) for _, grid in _grids(result)]
    data = np.concatenate([g.ravel() for g in every])
    low, centre, high = scale_bounds(result.metric, data, result.clean, result.corrupt)
    cells: list[tuple[float, str, int, int | None, int | None]] = []
    for hook, grid in _grids(result):
        rows: list[tuple[str, list[Any], int, int | None]]
        if hook == "attn_head" and not result.per_position:
            _print_head_grid(console, result, grid, (low, centre, high), cells)
            continue
        if hook == "attn_head":  # one row per (layer, head)
            heads = result.heads or []
            rows = [
                (f"L{layer}.H{head}", [row[j][k] for j in range(len(row))], layer, head)
                for layer, row in zip(result.layers, grid, strict=True)
                for k, head in enumerate(heads)
            ]
        else:
            rows = [
                (f"L{layer}", row, layer, None)
                for layer, row in zip(result.layers, grid, strict=True)
            ]
        table = Table(title=f"{hook} — {result.metric}", show_lines=False, pad_edge=False)
        table.add_column("layer", justify="right")
        for label in labels:
            table.add_column(repr(label)[1:-1][:8], justify="center", no_wrap=True)
        for name, row, layer, head in rows:
            texts = []
            for p, value in zip(result.positions, row, strict=True):
                shown = "  ·  " if value is None else f"{value:5.2f}"
                texts.append(Text(shown, style=f"on {_colour(value, low, centre, high)}"))
                if value is not None:
                    cells.append((value, hook, layer, p, head))
            table.add_row(name, *texts)
        console.print(table)
    clean = "n/a" if result.clean is None else f"{result.clean:.4g}"
    console.print(
        f"clean {clean}  corrupt {result.corrupt:.4g}  noise floor "
        f"{result.noise_floor:.2g}  answer {result.answer_token!r}  "
        f"{result.timing.cells} cells in {result.timing.seconds:.2f}s"
    )
    lower = result.metric in LOWER_IS_BETTER
    console.print(f"top {top} cells ({'lowest' if lower else 'highest'} {result.metric} first):")
    if result.kinds is not None:
        console.print(f"method {result.method}: values marked ~ are first-order estimates")
    for value, hook, layer, at, head in sorted(cells, key=lambda c: c[0] if lower else -c[0])[:top]:
        where = f"head {head} " if head is not None else ""
        mark = "~" if _kind(result, hook, layer, at, head) == "estimate" else " "
        if at is None:
            console.print(f" {mark}{value:8.4f}  {hook} layer {layer} {where}(every position)")
            continue
        token = tokens[at] if at < len(tokens) else "?"
        console.print(f" {mark}{value:8.4f}  {hook} layer {layer} {where}position {at} {token!r}")


def _kind(result: SweepBody, hook: str, layer: int, position: int | None, head: int | None) -> str:
    """``exact`` or ``estimate`` of one cell of the result."""
    if result.kinds is None or position is None:
        return "exact"
    kinds: Any = result.kinds[hook]
    kind = kinds[result.layers.index(layer)][result.positions.index(position)]
    if head is not None:
        kind = kind[(result.heads or []).index(head)]
    return str(kind)


def run(args: argparse.Namespace) -> int:
    if args.facts:
        return run_facts(args)
    console = Console()
    body = _request(args)
    progress = Progress(
        TextColumn("[bold]sweeping"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    task = None

    def on_cell(event: CellEvent) -> None:
        nonlocal task
        if task is None:
            task = progress.add_task("sweep", total=event.total)
        progress.update(task, completed=event.done, total=event.total)

    with progress:
        if args.url:
            result = _run_remote(args, body, on_cell)
        else:
            result = _run_in_process(args, body, on_cell)
    print_result(console, result, args.top)
    for message in result.warnings:
        console.print(f"warning: {message}", style="yellow", markup=False, highlight=False)
    if args.json:
        Path(args.json).write_text(result.model_dump_json(indent=2))
        console.print(f"wrote {args.json}")
    if args.out:
        import matplotlib

        from patchserve.client import SweepResult

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from patchserve.client.figures import heatmaps

        figure = heatmaps(SweepResult.per_hook(result))  # every hook, on one shared scale
        figure.savefig(args.out, dpi=150, bbox_inches="tight")
        plt.close(figure)
        console.print(f"wrote {args.out}")
    return 0
