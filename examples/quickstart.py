"""A one-call causal-tracing study with the patchserve client.

Start a server first (``make run`` serves the bundled demo model on port 8000),
then::

    python examples/quickstart.py                       # http://localhost:8000
    python examples/quickstart.py --url http://host:8000 --out heatmap.png

One ``sweep_layers_positions`` call captures the clean prompt, sweeps the
corrupt one over every (layer, position) of the residual stream, grades each
cell and drops the capture. The script prints the best cells and saves the
heatmap. On the bundled demo model it uses the first pair of the model's
``examples.json``; on any other model, a generic pair (or ``--clean/--corrupt``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from patchserve import PatchStudy, SweepResult

FALLBACK = {
    "clean": "The capital of Spain is",
    "corrupt": "The capital of Italy is",
    "answer": None,  # the clean run's top-1 token
    "foil": None,
}


def demo_example(model_id: str) -> dict[str, Any] | None:
    """The first example pair of the bundled demo model, if that is what the server runs."""
    try:
        from patchserve.assets import DEMO_MODEL, default_model_path
    except ImportError:  # pragma: no cover - an installation without the assets module
        return None
    examples = default_model_path() / "examples.json"
    if DEMO_MODEL not in model_id or not examples.is_file():
        return None
    return json.loads(examples.read_text())[0]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://localhost:8000", help="a running server")
    parser.add_argument("--out", type=Path, default=Path("heatmap.png"), help="heatmap PNG")
    parser.add_argument("--clean", help="clean prompt (default: the demo's or a generic one)")
    parser.add_argument("--corrupt", help="corrupt prompt")
    parser.add_argument("--answer", help="answer token (default: the clean top-1 token)")
    parser.add_argument("--foil", help="foil token (metric: recovered logit difference)")
    parser.add_argument("--hook", default="post_block")
    parser.add_argument("--top", type=int, default=5, help="how many cells to print")
    return parser.parse_args(argv)


def summarise(result: SweepResult, top: int) -> None:
    answer = result.answer_token or result.answer_token_id
    print(f"metric {result.metric} of {answer!r} at hook {result.hook}")
    print(f"  clean {result.clean:.4f}   corrupt {result.corrupt:.4f}   ", end="")
    print(f"noise floor {result.noise_floor:.2g}   {result.timing.get('cells')} cells ", end="")
    print(f"in {result.timing.get('seconds', 0.0):.3f} s")
    print(f"top {top} cells:")
    for cell in result.top(top):
        print(f"  layer {cell['layer']:>3}  position {cell['position']:>3} ", end="")
        print(f"{cell['token']!r:<14} {cell['value']:+.4f}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with PatchStudy(args.url, hook=args.hook) as study:
        info = study.model_info()
        example = dict(demo_example(info["id"]) or FALLBACK)
        for key in ("clean", "corrupt", "answer", "foil"):
            if getattr(args, key) is not None:
                example[key] = getattr(args, key)
        print(f"model {info['id']} ({info['architecture']}, {info['num_layers']} layers)")
        print(f"clean   {example['clean']!r}\ncorrupt {example['corrupt']!r}")
        result = study.sweep_layers_positions(
            example["corrupt"],
            clean_prompt=example["clean"],
            answer_token=example["answer"],
            foil_token=example["foil"],
            metric="recovered",
        )
        assert isinstance(result, SweepResult)
        summarise(result, args.top)
        ax = result.heatmap()  # fixed -1..1 scale; the title names answer, model, baselines
        args.out.parent.mkdir(parents=True, exist_ok=True)
        ax.figure.savefig(args.out, dpi=120)
        plt.close(ax.figure)
        print(f"heatmap saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
