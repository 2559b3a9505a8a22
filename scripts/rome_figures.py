"""ROME's averaged causal traces on the bundled demo model: the figures of docs/tutorial.md.

Noise on each fact's subject (its words that differ in ``examples.json``'s corrupt prompt),
``samples`` draws per cell, every fact example (not IOI), ``post_block`` single states and
``mlp_out`` / ``attn_out`` restored over a window; prints each aggregate's average indirect
effect (ROME's Fig. 2) and saves one role x layer heatmap per hook.

    .venv/bin/python scripts/rome_figures.py --out docs/images
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

from patchserve.assets import default_model_path
from patchserve.client.facts import StudyResult, fact_items
from patchserve.engine.service import StudyResources
from patchserve.engine.study_items import FactStudy
from patchserve.models import load_model
from patchserve.text.tokenizer import Tokenizer
from patchserve.wire.study import PatchStudyRequest

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="docs/images")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--metric", default="prob")
    parser.add_argument(
        "--model", type=Path, default=None, help="model folder (default: the bundled demo)"
    )
    args = parser.parse_args()
    path = args.model or default_model_path()
    loaded = load_model(path)
    res = StudyResources(loaded.model, Tokenizer.from_folder(loaded.path), path.name)
    facts = [e for e in json.loads((path / "examples.json").read_text()) if e["relation"] != "ioi"]
    items = fact_items(facts, "noise", {"samples": args.samples, "seed": 0})
    for hook, window in (("post_block", 1), ("mlp_out", args.window), ("attn_out", args.window)):
        req = PatchStudyRequest(items=items, hook=hook, window=window, metric=args.metric)
        result = StudyResult.from_body(FactStudy(res, req).run(), hooks_given=False)
        role = result.aggregate[hook]
        effect = role.effects()
        print(
            f"{hook} window {window}: mean {args.metric} - corrupt over {role.items} facts "
            f"(clean {role.clean:.4f}, corrupt {role.corrupt:.4f})"
        )
        for r, name in enumerate(role.roles):
            row = "  ".join(f"{v:+.3f}" for v in (line[r] for line in effect.grid))
            print(f"  {name:24s} ({role.counts[r]:2d})  {row}")
        ax = effect.heatmap()
        ax.figure.savefig(Path(args.out) / f"rome_{hook}.png", dpi=120, bbox_inches="tight")
        plt.close(ax.figure)


if __name__ == "__main__":
    main()
