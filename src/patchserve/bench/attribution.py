"""Attribution benchmark: first-order estimates against the exact grid, side by side.

``patchserve bench attribution`` times, in one run on one model, the
``post_block`` grid (every layer x every position, log p(answer)) computed

* exactly by the sweep engine (``method="exact"``);
* by attribution patching (``method="attribution"``: one corrupt forward, one backward);
* by ``method="attribution+verify"`` with the top ``--top-k`` cells exact (checked
  bit for bit against the exact grid: ``verified_bit_equal``);
* and, unless ``--no-peer``, by the idiomatic peer: ``transformers`` with a forward
  hook on each decoder layer, one batched forward per layer (row ``r`` patched at
  position ``r``), last-position logits only (``logits_to_keep=1``);

and reports how well the estimates rank the cells: Spearman's rank correlation
with the exact grid and top-k recall (how many of the exact grid's k largest
|changes| are among the estimate's k largest).

    patchserve bench attribution                       # 8 x 512, 32k vocab, 75 tokens
    patchserve bench attribution --examples            # the bundled model's examples
    patchserve bench attribution --qwen3-0.6b --tokens 200 --no-peer
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchserve.bench.peers import Study, transformers_hooks
from patchserve.bench.sweep import SHAPES, build_checkpoint, prompts
from patchserve.cli.help import HelpFormatter
from patchserve.engine.runs import capture_run
from patchserve.engine.sweep import SweepOutcome, SweepSpec, run_sweep
from patchserve.models import Transformer, load_model, pack_weights


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two equally long vectors (average ranks for ties)."""

    def ranks(x: np.ndarray) -> np.ndarray:
        r = np.empty(len(x))
        r[np.argsort(x, kind="stable")] = np.arange(len(x))
        _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=r)
        return (sums / counts)[inverse]

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def top_recall(exact: np.ndarray, estimate: np.ndarray, baseline: float, k: int) -> float:
    """Share of the exact grid's ``k`` largest |change| cells among the estimate's ``k``."""
    want = set(np.argsort(-np.abs(exact - baseline), kind="stable")[:k].tolist())
    got = set(np.argsort(-np.abs(estimate - baseline), kind="stable")[:k].tolist())
    return len(want & got) / k


def flat(outcome: SweepOutcome) -> np.ndarray:
    grid = outcome.grids["post_block"]
    return np.asarray([[np.nan if v is None else v for v in row] for row in grid], dtype=float)


def timed(model: Transformer, spec: SweepSpec, **changes: Any) -> tuple[SweepOutcome, float]:
    run_spec = SweepSpec(**{**spec.__dict__, **changes})
    start = time.perf_counter()
    outcome = run_sweep(model, run_spec)
    return outcome, time.perf_counter() - start


def study(
    model: Transformer,
    clean: list[int],
    corrupt: list[int],
    answer: int | None,
    top_k: int,
    exact: bool = True,
) -> dict[str, Any]:
    """One grid four ways (exact, attribution, attribution+verify; timed), with the ranking."""
    layers = list(range(model.cfg.num_layers))
    run = capture_run(model, "clean", "", clean, {"post_block": layers})
    spec = SweepSpec(corrupt, ["post_block"], layers, list(range(len(corrupt))), run)
    spec.answer = answer
    pack_weights(model)  # as a server does at start-up (models/invariance.py)
    timed(model, spec, method="attribution", layers=layers[-2:])  # warm-up
    est, est_s = timed(model, spec, method="attribution")
    verified, verify_s = timed(model, spec, method="attribution+verify", verify_top_k=top_k)
    out: dict[str, Any] = {
        "tokens": len(corrupt),
        "cells": len(layers) * len(corrupt),
        "answer": est.answer,
        "attribution_s": est_s,
        "verify_s": verify_s,
        "verified_cells": int(verified.stats["verified"]),
    }
    if exact:
        grid, exact_s = timed(model, spec, answer=est.answer)
        truth, guess, merged = flat(grid), flat(est), flat(verified)
        assert verified.kinds is not None  # an attribution+verify outcome marks its cells
        exact_mask = np.asarray(verified.kinds["post_block"], dtype=object) == "exact"
        keep = ~np.isnan(truth)
        out.update(
            exact_s=exact_s,
            spearman=spearman(truth[keep], guess[keep]),
            top_recall=top_recall(truth[keep], guess[keep], grid.corrupt, top_k),
            verified_top_recall=top_recall(truth[keep], merged[keep], grid.corrupt, top_k),
            verified_bit_equal=bool(np.array_equal(truth[exact_mask], merged[exact_mask])),
            max_abs_error=float(np.nanmax(np.abs(truth - guess))),
            _truth=truth,
        )
    return out


def examples_report(top_k: int) -> dict[str, Any]:
    """Every example of the bundled model (its answer token, log p)."""
    from patchserve.assets import default_model_path
    from patchserve.engine.request import resolve_token
    from patchserve.text.tokenizer import Tokenizer

    folder = default_model_path()
    model, tok = load_model(folder).model, Tokenizer.from_folder(folder)
    rows = []
    for example in json.loads((folder / "examples.json").read_text()):
        clean, corrupt = tok.encode(example["clean"]).ids, tok.encode(example["corrupt"]).ids
        if len(clean) != len(corrupt):
            continue  # compare grids over aligned cells only
        answer = resolve_token(tok, model.cfg.vocab_size, example["answer"], None, "answer")
        row = study(model, clean, corrupt, answer, top_k)
        row.pop("_truth")
        rows.append(row)
    keys = ["exact_s", "attribution_s", "verify_s", "spearman", "top_recall"]
    return {
        "model": f"bundled demo ({model.cfg.num_layers}x{model.cfg.hidden_size})",
        "examples": len(rows),
        "mean": {k: float(np.mean([r[k] for r in rows])) for k in keys},
        "min_spearman": float(min(r["spearman"] for r in rows)),
        "rows": rows,
    }


def random_report(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(args.cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if args.qwen3_06b:
        checkpoint = build_checkpoint(**SHAPES["qwen3-0.6b"], folder=folder)
    else:
        checkpoint = build_checkpoint("qwen3", args.layers, args.width, args.vocab, folder)
    model = load_model(checkpoint).model
    cfg = model.cfg
    clean, corrupt = prompts(cfg.vocab_size, args.tokens, args.differ_at)
    row = study(model, clean, corrupt, None, args.top_k, exact=not args.no_exact)
    truth = row.pop("_truth", None)
    row["model"] = f"qwen3 {cfg.num_layers}x{cfg.hidden_size}, vocab {cfg.vocab_size}"
    if not args.no_peer:
        layers = list(range(cfg.num_layers))
        result, grid = transformers_hooks(Study(checkpoint, clean, corrupt, layers, row["answer"]))
        peer, peer_s = np.asarray(grid), result.seconds
        row["peer_s"] = peer_s
        row["peer_over_verify"] = peer_s / row["verify_s"]
        row["peer_over_attribution"] = peer_s / row["attribution_s"]
        if truth is not None:
            row["max_abs_diff_vs_peer"] = float(np.nanmax(np.abs(truth - peer)))
    return row


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="patchserve bench attribution",
        description=(__doc__ or "").replace("``", "").replace("**", ""),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--examples", action="store_true", help="the bundled model's examples")
    p.add_argument("--qwen3-0.6b", dest="qwen3_06b", action="store_true")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--tokens", type=int, default=75)
    p.add_argument("--differ-at", type=int, default=2)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--no-peer", action="store_true", help="skip the transformers loop")
    p.add_argument("--no-exact", action="store_true", help="skip the engine's exact grid")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "patchserve-bench"))
    p.add_argument("--json", help="also write the report here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    report = examples_report(args.top_k) if args.examples else random_report(args)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
