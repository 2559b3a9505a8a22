"""The ``patchserve`` command line."""

from __future__ import annotations

import argparse
import json
import sys


def _info(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from patchserve.models import load_model

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    cfg = asdict(loaded.config)
    params = sum(p.numel() for p in loaded.model.parameters())
    print(json.dumps({"path": str(loaded.path), "parameters": params, "config": cfg}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="load a checkpoint and print its runtime config")
    info.add_argument("--model", required=True, help="checkpoint folder or hub id")
    info.add_argument("--device", default="cpu")
    info.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
