"""``patchserve sweep``'s causal-tracing flags: noise on a subject, window restores, and a
study over a file of facts (``--facts examples.json``) printed as ROME's role table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from patchserve.cli.errors import CommandError
from patchserve.wire.study import PatchStudyBody, PatchStudyRequest

if TYPE_CHECKING:  # the client is imported when a study runs: `patchserve serve` needs none
    from patchserve.client.facts import RoleResult


def add_tracing_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--noise",
        metavar="SUBJECT",
        help="corrupt by Gaussian noise on SUBJECT's embeddings (a substring of --clean) "
        "instead of --corrupt",
    )
    p.add_argument("--samples", type=int, default=10, help="noise draws averaged per cell")
    p.add_argument("--noise-scale", type=float, default=3.0, help="noise std / embeddings' std")
    p.add_argument("--seed", type=int, default=0, help="noise seed (same seed, same grid)")
    p.add_argument("--window", type=int, default=1, help="layers restored at once per cell")
    p.add_argument(
        "--facts",
        help="a JSON list of facts ({clean, corrupt, answer, foil} as examples.json, or "
        "{prompt, subject, answer}): a /v1/patch_study averaged on ROME's token roles",
    )
    p.add_argument(
        "--replace", action="store_true", help="with --facts: patch into each corrupt prompt"
    )


def _noise(args: argparse.Namespace) -> dict[str, Any]:
    return {"samples": args.samples, "scale": args.noise_scale, "seed": args.seed}


def corruption_fields(args: argparse.Namespace) -> dict[str, Any]:
    """``prompt`` and how it is corrupted, from ``--clean`` with ``--corrupt`` or ``--noise``."""
    if args.clean is None:
        raise CommandError("give --clean (with --corrupt or --noise SUBJECT), or --facts FILE")
    if (args.corrupt is None) == (args.noise is None):
        raise CommandError("give exactly one of --corrupt and --noise SUBJECT")
    window = {"window": args.window} if args.window != 1 else {}
    if args.noise is not None:
        noise = {"type": "noise", "span": args.noise, **_noise(args)}
        return {"prompt": args.clean, "corruption": noise, **window}
    return {"prompt": args.corrupt, "clean_prompt": args.clean, **window}


def _study_body(args: argparse.Namespace) -> dict[str, Any]:
    from patchserve.cli.sweep import parse_layers_arg
    from patchserve.client.facts import fact_items

    try:
        facts = json.loads(Path(args.facts).read_text())
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot read the facts file {args.facts}: {exc}") from exc
    if not isinstance(facts, list) or not facts:
        raise CommandError(f"{args.facts} must hold a non-empty JSON list of facts")
    corruption = "replace" if args.replace else "noise"
    try:
        items = fact_items(facts, corruption, _noise(args))
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    layers = parse_layers_arg(args.layers)
    hooks = [h.strip() for h in args.hooks.split(",") if h.strip()]
    body = {"items": items, "hooks": hooks, "window": args.window, "metric": args.metric}
    if layers != "all":
        if isinstance(layers, dict):
            raise CommandError("--facts takes --layers as a list (0,2,5 or 2-6)")
        body["layers"] = layers
    return body


def _in_process(args: argparse.Namespace, body: dict[str, Any]) -> PatchStudyBody:
    from patchserve.cli.main import require_server_extra

    require_server_extra("patchserve sweep --facts without --url")
    from patchserve.assets import default_model_path
    from patchserve.engine.service import StudyResources
    from patchserve.engine.study_items import FactStudy
    from patchserve.models import load_model
    from patchserve.text.tokenizer import Tokenizer
    from patchserve.wire.errors import validation_message

    loaded = load_model(args.model or default_model_path(), device=args.device, dtype=args.dtype)
    resources = StudyResources(loaded.model, Tokenizer.from_folder(loaded.path), loaded.path.name)
    try:
        request = PatchStudyRequest.model_validate(body)
    except ValidationError as exc:
        raise CommandError(validation_message(exc.errors())[0]) from exc
    return FactStudy(resources, request).run()


def _remote(args: argparse.Namespace, body: dict[str, Any]) -> PatchStudyBody:
    import httpx

    from patchserve.wire.errors import ErrorBody

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        with httpx.Client(base_url=args.url, timeout=None, headers=headers) as client:
            response = client.post("/v1/patch_study", json=body)
    except httpx.TransportError as exc:
        raise CommandError(f"cannot reach {args.url}: {exc}") from exc
    if response.status_code >= 400:
        error = ErrorBody.model_validate_json(response.content).error
        raise CommandError(f"{response.status_code}: {error.message}")
    return PatchStudyBody.model_validate_json(response.content)


def print_roles(console: Console, role: RoleResult) -> None:
    """ROME's table: one row per token role, one column per layer (mean indirect effect)."""
    effect = role.effects()
    window = f", window {role.window}" if role.window > 1 else ""
    title = f"{role.hook}{window} — mean {role.metric} - corrupt, {role.items} facts"
    table = Table(title=title)
    table.add_column("token role (tokens)")
    for layer in role.layers:
        table.add_column(f"L{layer}", justify="right")
    for r, name in enumerate(role.roles):
        values = [row[r] for row in effect.grid]
        texts = ["·" if v is None else f"{v:+.3f}" for v in values]
        table.add_row(f"{name} ({role.counts[r]})", *texts)
    console.print(table)


def run_facts(args: argparse.Namespace) -> int:
    from patchserve.client.facts import StudyResult

    console = Console()
    body = _study_body(args)
    with console.status(f"tracing {len(body['items'])} facts"):
        out = _remote(args, body) if args.url else _in_process(args, body)
    result = StudyResult.from_body(out, hooks_given=True)
    for role in result.aggregate.values():
        print_roles(console, role)
    clean = "n/a" if out.aggregate.clean is None else f"{out.aggregate.clean:.4g}"
    console.print(f"mean clean {clean}  mean corrupt {out.aggregate.corrupt:.4g}")
    if args.json:
        Path(args.json).write_text(out.model_dump_json(indent=2))
        console.print(f"wrote {args.json}")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        roles = list(result.aggregate.values())
        figure, axes = plt.subplots(
            len(roles), 1, figsize=(7, 3.6 * len(roles)), squeeze=False, layout="constrained"
        )
        for role, ax in zip(roles, axes[:, 0], strict=True):
            role.effects().heatmap(ax)
        figure.savefig(args.out, dpi=150, bbox_inches="tight")
        plt.close(figure)
        console.print(f"wrote {args.out}")
    return 0
