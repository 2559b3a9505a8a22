"""Sweep benchmark: this engine against the usual ways of computing the same grid.

One run, one model, one grid (every layer x every position of ``post_block``
unless told otherwise), timed side by side:

* **patchserve** — the sweep engine (prefix-cache reuse, start at the patched
  layer, packed rows, last-position logits);
* **batched full forward** — one forward per layer batching every position's
  patched copy of the prompt (the usual hand-optimised notebook loop), on the
  same runtime and kernels, logits at the last position only;
* **naive per-cell** — one full forward per cell (timed on a sample of cells);
* **the peer libraries** (``pip install -e ".[bench]"``; see bench/peers.py),
  each batched one forward per layer and as fast as it allows: a
  ``transformers`` forward-hook loop and nnsight's ``trace``, both with
  ``logits_to_keep=1``; TransformerLens' ``run_with_hooks`` both as users run it
  (logits at every position) and with ``logits_to_keep=1``, and its
  ``patching.generic_activation_patch`` (per cell, sampled).

The speed-up quoted first is the one over the fastest peer that computes the
whole grid.

It prints cells/s, the speed-up of patchserve over each, and patchserve's
achieved FLOP/s against the minimal FLOP count of the sweep and against this
machine's measured float32 matmul rate.

    patchserve bench                         # Qwen3-shaped, 8 x 512, 32k vocab, 78 tokens
    patchserve bench --family gpt2 --tokens 256
    patchserve bench --family olmo2          # or mixtral: 8 experts, 2 per token
    patchserve bench --memory --layers 12 --width 256 --tokens 256
    patchserve bench --dtype bfloat16 --invariance-cost   # + the sweep with invariant=False
    patchserve bench --model src/patchserve/assets/demo_facts   # any checkpoint folder
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from patchserve.bench.peers import (
    Result,
    Study,
    nnsight_loop,
    transformer_lens_loops,
    transformers_hooks,
)
from patchserve.cli.help import HelpFormatter
from patchserve.engine.flops import full_forward_flops
from patchserve.engine.metrics import Grader
from patchserve.engine.runs import capture_run
from patchserve.engine.sweep import SweepSpec, run_sweep
from patchserve.models import HookContext, Transformer, load_model, make_edit
from patchserve.models.invariance import sweeps_not_invariant

# Real models' shapes with random weights (no download): `--shape`, and benchmarks/gpu.py.
SHAPES: dict[str, dict] = {
    "qwen3-0.6b": dict(
        family="qwen3",
        layers=28,
        width=1024,
        vocab=151936,
        heads=16,
        kv_heads=8,
        head_dim=128,
        mlp=3072,
    ),
    # Llama-3-8B's layer shape and vocabulary, 8 of its 32 layers (a run fits minutes).
    "llama-3-8b-like": dict(
        family="llama",
        layers=8,
        width=4096,
        vocab=128256,
        heads=32,
        kv_heads=8,
        head_dim=128,
        mlp=14336,
    ),
}


def build_checkpoint(
    family: str,
    layers: int,
    width: int,
    vocab: int,
    folder: Path,
    heads: int | None = None,
    kv_heads: int | None = None,
    head_dim: int = 64,
    mlp: int | None = None,
) -> Path:
    """A random checkpoint of the given shape, saved with transformers (cached on disk)."""
    import transformers as tf

    heads = heads or max(1, width // 64)
    kv_heads = kv_heads or max(1, heads // 2)
    mlp = mlp or 3 * width
    default = (heads, kv_heads, head_dim, mlp) == (
        max(1, width // 64),
        max(1, heads // 2),
        64,
        3 * width,
    )
    tail = "" if default else f"-h{heads}-kv{kv_heads}-d{head_dim}-m{mlp}"
    path = folder / f"{family}-{layers}x{width}-v{vocab}{tail}"
    if (path / "config.json").exists():
        return path
    config: tf.PretrainedConfig
    if family in ("qwen3", "llama"):
        config = (tf.Qwen3Config if family == "qwen3" else tf.LlamaConfig)(
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=mlp,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=4096,
            tie_word_embeddings=family == "qwen3",
        )
    elif family in ("olmo2", "mixtral"):
        # OLMo-2 (norms after the branches, full-width q/k norm) and Mixtral (8 experts, 2 per
        # token, each expert the dense MLP's width): the same shape options as the others.
        common: dict[str, Any] = dict(
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=mlp,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=4096,
        )
        if family == "olmo2":
            config = tf.Olmo2Config(**common)
        else:
            config = tf.MixtralConfig(**common, num_local_experts=8, num_experts_per_tok=2)
    elif family == "gpt2":
        config = tf.GPT2Config(
            vocab_size=vocab, n_embd=width, n_layer=layers, n_head=heads, n_positions=4096
        )
    else:
        raise SystemExit(f"unknown family {family}")
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    return path


def shape_checkpoint(args: argparse.Namespace, folder: Path) -> Path:
    """The checkpoint of ``--shape`` (a real model's shape) or of the size options."""
    if args.shape:
        return build_checkpoint(**SHAPES[args.shape], folder=folder)
    return build_checkpoint(args.family, args.layers, args.width, args.vocab, folder)


PLAIN = "patchserve, invariant=False"  # --invariance-cost: the same sweep, not batch-invariant


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    pairs = (zip(ra, rb, strict=True) for ra, rb in zip(a, b, strict=True))
    return max(abs(x - y) for row in pairs for x, y in row)


def _fastest_peer(results: list[Result]) -> Result:
    """The fastest peer library computing the whole grid (the batched loop on this runtime
    when no peer library is installed)."""
    full = [r for r in results[1:] if r.cells == results[0].cells and r.name != PLAIN]
    libraries = [r for r in full if r.name != "batched full forward"]
    return max(libraries or full, key=lambda r: r.cells_per_second)


def run_peers(study: Study, sample: int) -> list[tuple[Result, list[list[float]] | None]]:
    """Every installed peer library, timed one after the other."""
    out: list[tuple[Result, list[list[float]] | None]] = [transformers_hooks(study)]
    nnsight = nnsight_loop(study)
    if nnsight is not None:
        out.append(nnsight)
    return out + transformer_lens_loops(study, sample)


def matmul_rate(seconds: float = 2.0) -> float:
    """float32 GEMM FLOP/s of this machine at a transformer-sized shape."""
    a, b = torch.randn(4096, 512), torch.randn(512, 1536)
    for _ in range(3):
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return n * 2 * 4096 * 512 * 1536 / (time.perf_counter() - start)


def prompts(vocab: int, tokens: int, differ_at: int) -> tuple[list[int], list[int]]:
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(10, vocab, (tokens,), generator=gen).tolist()
    corrupt = list(clean)
    corrupt[differ_at] = (clean[differ_at] + 1) % vocab
    return clean, corrupt


def batched_full_forward(
    model: Transformer, corrupt: list[int], run, layers: list[int], hook: str, grader: Grader
) -> list[list[float]]:
    """One forward per layer: row r is the corrupt prompt patched at position r."""
    t = len(corrupt)
    ids = torch.tensor([corrupt]).expand(t, -1)
    grid = []
    for layer in layers:
        source = run.activations[hook, layer]
        edit = make_edit(layer, hook, range(t), range(t), source)
        with torch.inference_mode():
            logits = model.prefill(ids, HookContext.build([edit])).logits
        grid.append(grader(logits).tolist())
    return grid


def naive_cells(model, corrupt, run, cells, hook, grader) -> None:
    ids = torch.tensor([corrupt])
    for layer, pos in cells:
        edit = make_edit(layer, hook, [0], [pos], run.activations[hook, layer][pos][None])
        with torch.inference_mode():
            logits = model.prefill(ids, HookContext.build([edit])).logits
        grader(logits)


def _keep(best: dict[str, Result], result: Result) -> None:
    """Keep the fastest run of each method (rounds run in turn: load bursts hit them alike)."""
    if result.name not in best or result.seconds < best[result.name].seconds:
        best[result.name] = result


def naive_result(model, corrupt, run_, layers, positions, hook, grader, args) -> Result:
    """One full forward per cell on a sample of the grid's cells."""
    sample = [
        (layers[i % len(layers)], positions[(7 * i) % len(positions)])
        for i in range(args.naive_cells)
    ]
    start = time.perf_counter()
    naive_cells(model, corrupt, run_, sample, hook, grader)
    seconds = time.perf_counter() - start
    return Result("naive per-cell forward", len(sample), seconds, f"sampled {len(sample)} cells")


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    folder = Path(args.cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(args.model) if args.model else shape_checkpoint(args, folder)
    loaded = load_model(checkpoint, dtype=args.dtype, runtime=args.runtime)
    model, cfg = loaded.model, loaded.config
    clean, corrupt = prompts(cfg.vocab_size, args.tokens, args.differ_at)
    hook = args.hook
    layers = list(range(cfg.num_layers))
    positions = list(range(args.tokens))
    run_ = capture_run(model, "clean", "", clean, {hook: layers})
    spec = SweepSpec(
        corrupt_ids=corrupt,
        hooks=[hook],
        layers=layers,
        positions=positions,
        source=run_,
        max_batch_tokens=args.batch_tokens,
    )
    rate = matmul_rate()
    # Warm-up, then the timed engine run.
    run_sweep(
        model, SweepSpec(**{**spec.__dict__, "layers": layers[-2:], "positions": positions[-4:]})
    )
    cells = len(layers) * len(positions)
    best: dict[str, Result] = {}  # each method's fastest of --repeat rounds, run in turn
    peer_diffs: dict[str, float] = {}
    for round_ in range(args.repeat):
        start = time.perf_counter()
        outcome = run_sweep(model, spec)
        note = f"{outcome.stats['computed']} computed, {outcome.stats['free']} free"
        _keep(best, Result("patchserve", cells, time.perf_counter() - start, note))
        grader = Grader("logprob", outcome.answer)
        if args.invariance_cost:
            start = time.perf_counter()
            with sweeps_not_invariant():
                plain = run_sweep(model, spec)
            _keep(best, Result(PLAIN, cells, time.perf_counter() - start, "plain products"))
            plain_diff = max_diff(outcome.grids[hook], plain.grids[hook])
        start = time.perf_counter()
        batched = batched_full_forward(model, corrupt, run_, layers, hook, grader)
        _keep(best, Result("batched full forward", cells, time.perf_counter() - start))
        if round_ == 0:
            diff = max_diff(outcome.grids[hook], batched)
            _keep(best, naive_result(model, corrupt, run_, layers, positions, hook, grader, args))
        if not args.no_peers and hook == "post_block":
            study = Study(checkpoint, clean, corrupt, layers, outcome.answer)
            for result, grid in run_peers(study, args.naive_cells):
                _keep(best, result)
                if grid is not None:
                    peer_diffs[result.name] = max_diff(outcome.grids[hook], grid)
    results = list(best.values())
    engine_s = results[0].seconds
    invariance = {}
    if args.invariance_cost:
        invariance = {
            "invariance_overhead": engine_s / best[PLAIN].seconds - 1,
            "max_abs_diff_vs_not_invariant": plain_diff,
        }
    fastest = _fastest_peer(results)

    flops = int(outcome.stats["flops"])
    baseline_flops = cells * full_forward_flops(cfg, args.tokens)
    report = {
        "machine": f"{os.cpu_count()} cpu, torch {torch.__version__}, {args.threads} threads",
        "model": f"{cfg.architecture} {cfg.num_layers}x{cfg.hidden_size}, vocab {cfg.vocab_size}, "
        f"{args.dtype}, {loaded.runtime} runtime",
        "tokens": args.tokens,
        "differ_at": args.differ_at,
        "hook": hook,
        "cells": cells,
        "batch_tokens": args.batch_tokens,
        "repeat": args.repeat,
        "load_average": os.getloadavg(),
        "matmul_gflops": rate / 1e9,
        "minimal_gflop": flops / 1e9,
        "full_forward_gflop": baseline_flops / 1e9,
        "engine_gflops": flops / engine_s / 1e9,
        "fraction_of_matmul_rate": flops / engine_s / rate,
        "max_abs_diff_vs_batched": diff,
        "max_abs_diff_vs_peers": peer_diffs,
        **invariance,
        "fastest_peer": fastest.name,
        "speedup_vs_fastest_peer": results[0].cells_per_second / fastest.cells_per_second,
        "results": [
            {
                "method": r.name,
                "cells": r.cells,
                "seconds": r.seconds,
                "cells_per_second": r.cells_per_second,
                "patchserve_speedup": results[0].cells_per_second / r.cells_per_second,
                "note": r.note,
            }
            for r in results
        ],
    }
    return report


def print_report(report: dict) -> None:
    print(
        f"model: {report['model']}; prompt {report['tokens']} tokens, corrupt token at "
        f"{report['differ_at']}; {report['hook']} grid of {report['cells']} cells"
    )
    print(f"machine: {report['machine']}; float32 matmul {report['matmul_gflops']:.1f} GFLOP/s")
    load = ", ".join(f"{x:.1f}" for x in report["load_average"])
    print(f"load average at the end (1, 5, 15 min): {load}; best of {report['repeat']} round(s)")
    print()
    print(f"{'method':<38} {'cells':>6} {'seconds':>9} {'cells/s':>9} {'patchserve x':>13}")
    for r in report["results"]:
        print(
            f"{r['method']:<38} {r['cells']:>6} {r['seconds']:>9.2f} {r['cells_per_second']:>9.1f} "
            f"{r['patchserve_speedup']:>12.2f}x  {r['note']}"
        )
    print()
    print(
        f"minimal FLOPs of the sweep: {report['minimal_gflop']:.1f} GFLOP "
        f"(full forward per cell: {report['full_forward_gflop']:.1f} GFLOP)"
    )
    print(
        f"patchserve achieved {report['engine_gflops']:.1f} GFLOP/s = "
        f"{100 * report['fraction_of_matmul_rate']:.0f}% of the measured matmul rate"
    )
    print(f"grid max |patchserve - batched full forward| = {report['max_abs_diff_vs_batched']:.2e}")
    if "invariance_overhead" in report:
        print(
            f"batch invariance costs {100 * report['invariance_overhead']:+.0f}% over "
            f"invariant=False; grids differ by {report['max_abs_diff_vs_not_invariant']:.2e}"
        )
    for name, peer_diff in report["max_abs_diff_vs_peers"].items():
        print(f"grid max |patchserve - {name}| = {peer_diff:.2e}")
    print(
        f"patchserve is {report['speedup_vs_fastest_peer']:.2f}x the fastest peer "
        f"({report['fastest_peer']})"
    )


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_report(args: argparse.Namespace) -> dict:
    """Peak extra memory of a full grid over model + corrupt-run cache (fresh process)."""
    torch.set_num_threads(args.threads)
    folder = Path(args.cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(args.model) if args.model else shape_checkpoint(args, folder)
    loaded = load_model(checkpoint, dtype=args.dtype)
    model, cfg = loaded.model, loaded.config
    clean, corrupt = prompts(cfg.vocab_size, args.tokens, args.differ_at)
    layers = list(range(cfg.num_layers))
    loaded_rss = rss_bytes()
    run_ = capture_run(model, "clean", "", clean, {"post_block": layers})
    before = rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    spec = SweepSpec(
        corrupt,
        ["post_block"],
        layers,
        list(range(args.tokens)),
        run_,
        max_batch_tokens=args.batch_tokens,
    )
    start = time.perf_counter()
    outcome = run_sweep(model, spec)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # The corrupt run the engine keeps: residual entering each block, post_block and the KV cache.
    t, d = args.tokens, cfg.hidden_size
    size = model.embed_tokens.weight.element_size()
    corrupt_cache = 2 * cfg.num_layers * t * (d + cfg.kv_size) * size
    extra = peak - max(before, peak_before) - corrupt_cache
    return {
        "model": f"{cfg.architecture} {cfg.num_layers}x{cfg.hidden_size}, vocab {cfg.vocab_size}",
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": args.dtype,
        "tokens": t,
        "cells": len(layers) * t,
        "seconds": seconds,
        "computed": outcome.stats["computed"],
        "rss_loaded_mib": loaded_rss / 2**20,
        "rss_before_mib": before / 2**20,
        "peak_mib": peak / 2**20,
        "corrupt_cache_mib": corrupt_cache / 2**20,
        "extra_mib": extra / 2**20,
        "batch_tokens": args.batch_tokens,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="patchserve bench",
        description=(__doc__ or "").replace("``", "").replace("**", ""),
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--family", default="qwen3", choices=["qwen3", "llama", "olmo2", "mixtral", "gpt2"]
    )
    p.add_argument("--shape", choices=list(SHAPES), help="a real model's shape (random weights)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--model", help="benchmark this checkpoint folder instead of a random one")
    p.add_argument(
        "--runtime",
        default="auto",
        choices=["auto", "native", "transformers"],
        help="what runs patchserve's model: transformers = the generic runtime (models/generic/)",
    )
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--tokens", type=int, default=78)
    p.add_argument("--differ-at", type=int, default=2)
    p.add_argument("--hook", default="post_block")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--naive-cells", type=int, default=40)
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of every method, in turn; each method's fastest round is reported",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "patchserve-bench"))
    p.add_argument(
        "--no-peers",
        "--no-transformer-lens",
        dest="no_peers",
        action="store_true",
        help="leave out the other libraries (transformers hooks, nnsight, TransformerLens)",
    )
    p.add_argument(
        "--invariance-cost",
        action="store_true",
        help="also time the same sweep without batch invariance (invariant=False: plain "
        "products, packed attention), side by side",
    )
    p.add_argument("--memory", action="store_true", help="measure peak memory of a full grid")
    p.add_argument("--json", help="also write the report here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.memory:
        report = memory_report(args)
        print(json.dumps(report, indent=2))
    else:
        report = run(args)
        print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
