"""The ``patchserve`` command line (also ``python -m patchserve``).

A user's mistake — a bad argument, a checkpoint that cannot be loaded, a
server that answers 4xx or cannot be reached — is one line ``error: ...`` on
stderr and exit status 2, in-process and over HTTP alike; a traceback means a
bug.
"""

from __future__ import annotations

import argparse
import json
import sys

from patchserve import __version__
from patchserve.cli.errors import CommandError
from patchserve.cli.help import HelpFormatter


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that are a user's mistake, not a bug (imported only when needed; the
    runtime's only where it is installed)."""
    import httpx

    from patchserve.errors import StudyError
    from patchserve.text.spans import SpanError

    errors: list[type[BaseException]] = [CommandError, StudyError, SpanError, httpx.HTTPError]
    if _has("torch") and _has("transformers"):
        from patchserve.models import CheckpointError, DeviceMapError
        from patchserve.text.tokenizer import TokenizerError

        errors += [CheckpointError, DeviceMapError, TokenizerError]
    return tuple(errors)


def require_server_extra(what: str) -> None:
    """One line saying what to install when the runtime/server dependencies are absent."""
    missing = [name for name in ("torch", "transformers", "fastapi", "uvicorn") if not _has(name)]
    if missing:
        raise CommandError(
            f"{what} needs the runtime and server ({', '.join(missing)} not installed): "
            "pip install 'patchserve[serve]'"
        )


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _info(args: argparse.Namespace) -> int:
    require_server_extra("patchserve info")
    from dataclasses import asdict

    from patchserve.models import load_model

    loaded = load_model(args.model, device=args.device, dtype=args.dtype, runtime=args.runtime)
    cfg = asdict(loaded.config)
    params = sum(p.numel() for p in loaded.model.parameters())
    info = {"path": str(loaded.path), "parameters": params, "runtime": loaded.runtime}
    info.update(hooks=list(loaded.hooks), fallback=loaded.fallback, config=cfg)
    print(json.dumps(info, indent=2))
    return 0


def _serve(args: argparse.Namespace) -> int:
    require_server_extra("patchserve serve")
    from pathlib import Path

    import torch

    from patchserve.server.app import create_app
    from patchserve.server.config import ServerConfig
    from patchserve.server.logs import configure as configure_logging
    from patchserve.server.shutdown import serve
    from patchserve.server.state import ServerState

    if args.replicas and args.device_map:
        raise CommandError("--device-map and --replicas together are not supported yet")
    if args.replicas and args.runtime == "transformers":
        raise CommandError("--replicas run the native runtime; drop --runtime transformers")
    if args.replicas and not _has("ray"):
        raise CommandError("--replicas needs Ray: pip install 'patchserve[ray]'")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ServerConfig(
        model=args.model,
        device=args.device,
        device_map=args.device_map,
        dtype=args.dtype,
        api_key=args.api_key,
        source_dir=Path(args.source_dir) if args.source_dir else None,
        source_cache_bytes=args.source_cache_bytes,
        max_batch_tokens=args.max_batch_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        max_cells=args.max_cells,
        max_body_bytes=args.max_body_bytes,
        max_prompts=args.max_prompts,
        served_model_name=args.served_model_name,
        replicas=args.replicas,
        ray_address=args.ray_address,
        runtime=args.runtime,
    )
    configure_logging(args.log_level)
    state = ServerState.from_config(config)
    print(
        f"patchserve: serving {state.model_name} ({state.loaded.config.architecture}, "
        f"{state.loaded.config.num_layers} layers) on http://{args.host}:{args.port}",
        flush=True,
    )
    app = create_app(state)
    serve(state, app, args.host, args.port, args.log_level, args.shutdown_grace)
    return 0


def _bench(args: argparse.Namespace) -> int:
    return _bench_main(args.bench_args)


def _bench_main(argv: list[str]) -> int:
    if argv[:1] == ["attribution"]:  # patchserve bench attribution [options]
        from patchserve.bench.attribution import main as attribution_main

        return attribution_main(argv[1:])
    if argv[:1] == ["generate"]:  # patchserve bench generate [options]
        from patchserve.bench.generate import main as generate_main

        return generate_main(argv[1:])
    from patchserve.bench.sweep import main as bench_main

    return bench_main(argv)


DTYPES = ["float32", "bfloat16", "float16"]


def _runtime_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runtime",
        default="auto",
        choices=["auto", "native", "transformers"],
        help="native: our hooked runtime; transformers: the model runs in transformers with "
        "hooks found from its module tree; auto: native when the architecture has a family",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patchserve",
        description="An activation-patching (causal tracing) server for transformer LMs.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"patchserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser(
        "info", help="load a checkpoint and print its runtime config", formatter_class=HelpFormatter
    )
    info.add_argument("--model", required=True, help="checkpoint folder or hub id")
    info.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    info.add_argument("--dtype", default="float32", choices=DTYPES, help="weights' dtype")
    _runtime_argument(info)
    info.set_defaults(func=_info)

    serve = sub.add_parser("serve", help="start the HTTP server", formatter_class=HelpFormatter)
    serve.add_argument("--model", help="checkpoint folder or hub id (default: the bundled demo)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    serve.add_argument("--dtype", default="float32", choices=DTYPES, help="weights' dtype")
    serve.add_argument(
        "--device-map",
        help="layers over devices instead of --device: auto, balanced, or '0:0-13,1:14-27'",
    )
    _runtime_argument(serve)
    serve.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1 routes")
    serve.add_argument("--source-dir", help="persist kept runs here and reload them at start")
    serve.add_argument(
        "--source-cache-bytes", type=int, help="byte budget of resident runs (default: 1/4 of RAM)"
    )
    serve.add_argument(
        "--max-batch-tokens", type=int, default=4096, help="tokens per batch of a sweep"
    )
    serve.add_argument(
        "--max-prompt-tokens", type=int, default=2048, help="longest prompt accepted (413 past it)"
    )
    serve.add_argument("--max-cells", type=int, default=200_000, help="largest grid accepted")
    serve.add_argument(
        "--max-body-bytes", type=int, default=64 * 2**20, help="largest request body (413 past it)"
    )
    serve.add_argument(
        "--max-prompts", type=int, default=2048, help="prompts in one completion (413 past it)"
    )
    serve.add_argument("--served-model-name", help="model id in /v1/models (default: folder name)")
    serve.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    serve.add_argument(
        "--replicas",
        type=int,
        default=0,
        help="run sweeps on N Ray actors, each with a model replica (needs patchserve[ray])",
    )
    serve.add_argument(
        "--ray-address", help="the Ray cluster of --replicas (default: start a local one)"
    )
    serve.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="seconds requests in flight may still run after SIGTERM (then they are stopped)",
    )
    serve.add_argument("--log-level", default="info", help="log level of the server and of uvicorn")
    serve.set_defaults(func=_serve)

    sweep = sub.add_parser(
        "sweep",
        help="run a patching study and print a heatmap table",
        formatter_class=HelpFormatter,
    )
    from patchserve.cli import sweep as sweep_cli

    sweep_cli.add_arguments(sweep)
    sweep.set_defaults(func=sweep_cli.run)

    bench = sub.add_parser(
        "bench",
        help="time the sweep engine against the usual loops (see patchserve bench --help)",
        add_help=False,
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":  # its own parser: every option passes through
        try:
            require_server_extra("patchserve bench")
        except CommandError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return _bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except _user_errors() as exc:
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
