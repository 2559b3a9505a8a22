"""Sweep benchmark: this engine against the usual ways of computing the same grid.

One run, one model, one grid (every layer x every position of ``post_block``
unless told otherwise), timed side by side:

* **patchserve** — the sweep engine (prefix-cache reuse, start at the patched
  layer, packed rows, last-position logits);
* **batched full forward** — one forward per layer batching every position's
  patched copy of the prompt (the usual hand-optimised notebook loop), on the
  same runtime and kernels, logits at the last position only;
* **naive per-cell** — one full forward per cell (timed on a sample of cells);
* **TransformerLens** (when ``transformer_lens`` is installed) — its
  ``patching.generic_activation_patch`` (per cell, sampled) and a hand-batched
  ``run_with_hooks`` loop, one forward per layer.

It prints cells/s, the speed-up of patchserve over each, and patchserve's
achieved FLOP/s against the minimal FLOP count of the sweep and against this
machine's measured float32 matmul rate.

    patchserve bench                         # Qwen3-shaped, 8 x 512, 32k vocab, 75 tokens
    patchserve bench --family gpt2 --tokens 256
    patchserve bench --memory --layers 12 --width 256 --tokens 256
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
from dataclasses import dataclass
from pathlib import Path

import torch

from patchserve.cli.help import HelpFormatter
from patchserve.engine.flops import full_forward_flops
from patchserve.engine.metrics import Grader
from patchserve.engine.runs import capture_run
from patchserve.engine.sweep import SweepSpec, run_sweep
from patchserve.models import HookContext, Transformer, load_model, make_edit
from patchserve.wire.hooks import TRANSFORMER_LENS_NAMES


@dataclass
class Result:
    name: str
    cells: int
    seconds: float
    note: str = ""

    @property
    def cells_per_second(self) -> float:
        return self.cells / self.seconds


def build_checkpoint(family: str, layers: int, width: int, vocab: int, folder: Path) -> Path:
    """A random checkpoint of the given shape, saved with transformers (cached on disk)."""
    import transformers as tf

    path = folder / f"{family}-{layers}x{width}-v{vocab}"
    if (path / "config.json").exists():
        return path
    heads = max(1, width // 64)
    config: tf.PretrainedConfig
    if family == "qwen3":
        config = tf.Qwen3Config(
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=3 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            head_dim=64,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
        )
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


def transformer_lens_results(
    checkpoint: Path, clean: list[int], corrupt: list[int], layers: list[int], sample: int
) -> tuple[list[Result], list[list[float]] | None]:
    try:
        from transformer_lens import patching
    except ImportError:
        return [], None
    from patchserve.bench.transformer_lens import load_hooked_transformer

    tl_model = load_hooked_transformer(checkpoint)
    t = len(corrupt)
    clean_t, corrupt_t = torch.tensor([clean]), torch.tensor([corrupt])
    with torch.inference_mode():
        _, cache = tl_model.run_with_cache(clean_t, names_filter=lambda n: "resid_post" in n)
        clean_logits = tl_model(clean_t)[0, -1]
    answer = int(clean_logits.argmax())

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits[:, -1].double(), -1)[:, answer]

    results = []
    # TransformerLens' own patching helper: one full forward per cell (sampled).
    index_df = __import__("pandas").DataFrame(
        [(layer, pos) for layer in layers[:1] for pos in range(min(sample, t))],
        columns=["layer", "pos"],
    )
    start = time.perf_counter()
    with torch.inference_mode():
        patching.generic_activation_patch(
            tl_model,
            corrupt_t,
            cache,
            metric,
            patch_setter=patching.layer_pos_patch_setter,
            activation_name="resid_post",
            index_df=index_df,
            reduce="mean",
        )
    results.append(
        Result(
            "TransformerLens patching (per cell)",
            len(index_df),
            time.perf_counter() - start,
            f"sampled {len(index_df)} cells",
        )
    )
    # The hand-batched loop: one run_with_hooks per layer, every position as a row.
    grid = []
    start = time.perf_counter()
    for layer in layers:
        name = f"blocks.{layer}.{TRANSFORMER_LENS_NAMES['post_block']}"
        clean_act = cache[name][0]

        def hook_fn(act, hook, clean_act=clean_act):
            rows = torch.arange(t)
            act[rows, rows] = clean_act[rows]
            return act

        with torch.inference_mode():
            logits = tl_model.run_with_hooks(corrupt_t.expand(t, -1), fwd_hooks=[(name, hook_fn)])
        grid.append(metric(logits).tolist())
    results.append(
        Result("TransformerLens batched loop", len(layers) * t, time.perf_counter() - start)
    )
    return results, grid


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    folder = Path(args.cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if args.model:
        checkpoint = Path(args.model)
    else:
        checkpoint = build_checkpoint(args.family, args.layers, args.width, args.vocab, folder)
    loaded = load_model(checkpoint)
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
    start = time.perf_counter()
    outcome = run_sweep(model, spec)
    engine_s = time.perf_counter() - start
    cells = len(layers) * len(positions)
    grader = Grader("logprob", outcome.answer)
    results = [
        Result(
            "patchserve",
            cells,
            engine_s,
            f"{outcome.stats['computed']} computed, {outcome.stats['free']} free",
        )
    ]

    start = time.perf_counter()
    batched = batched_full_forward(model, corrupt, run_, layers, hook, grader)
    results.append(Result("batched full forward", cells, time.perf_counter() - start))
    diff = max(
        abs(a - b)
        for row_a, row_b in zip(outcome.grids[hook], batched, strict=True)
        for a, b in zip(row_a, row_b, strict=True)
    )

    sample = [
        (layers[i % len(layers)], positions[(7 * i) % len(positions)])
        for i in range(args.naive_cells)
    ]
    start = time.perf_counter()
    naive_cells(model, corrupt, run_, sample, hook, grader)
    results.append(
        Result(
            "naive per-cell forward",
            len(sample),
            time.perf_counter() - start,
            f"sampled {len(sample)} cells",
        )
    )

    tl_diff = None
    if not args.no_transformer_lens and hook == "post_block":
        tl_results, tl_grid = transformer_lens_results(
            checkpoint, clean, corrupt, layers, args.naive_cells
        )
        results.extend(tl_results)
        if tl_grid is not None:
            tl_diff = max(
                abs(a - b)
                for row_a, row_b in zip(outcome.grids[hook], tl_grid, strict=True)
                for a, b in zip(row_a, row_b, strict=True)
            )

    flops = int(outcome.stats["flops"])
    baseline_flops = cells * full_forward_flops(cfg, args.tokens)
    report = {
        "machine": f"{os.cpu_count()} cpu, torch {torch.__version__}, {args.threads} threads",
        "model": f"{cfg.architecture} {cfg.num_layers}x{cfg.hidden_size}, vocab {cfg.vocab_size}",
        "tokens": args.tokens,
        "differ_at": args.differ_at,
        "hook": hook,
        "cells": cells,
        "batch_tokens": args.batch_tokens,
        "matmul_gflops": rate / 1e9,
        "minimal_gflop": flops / 1e9,
        "full_forward_gflop": baseline_flops / 1e9,
        "engine_gflops": flops / engine_s / 1e9,
        "fraction_of_matmul_rate": flops / engine_s / rate,
        "max_abs_diff_vs_batched": diff,
        "max_abs_diff_vs_transformer_lens": tl_diff,
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
    if report["max_abs_diff_vs_transformer_lens"] is not None:
        print(
            "grid max |patchserve - TransformerLens| = "
            f"{report['max_abs_diff_vs_transformer_lens']:.2e}"
        )


def memory_report(args: argparse.Namespace) -> dict:
    """Peak extra memory of a full grid over model + corrupt-run cache (fresh process)."""
    torch.set_num_threads(args.threads)
    folder = Path(args.cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = build_checkpoint(args.family, args.layers, args.width, args.vocab, folder)
    loaded = load_model(checkpoint)
    model, cfg = loaded.model, loaded.config
    clean, corrupt = prompts(cfg.vocab_size, args.tokens, args.differ_at)
    layers = list(range(cfg.num_layers))
    run_ = capture_run(model, "clean", "", clean, {"post_block": layers})
    rss = lambda: int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    before = rss()
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
    corrupt_cache = 2 * cfg.num_layers * t * d * 4 + 2 * cfg.num_layers * t * cfg.kv_size * 4
    extra = peak - max(before, peak_before) - corrupt_cache
    return {
        "model": f"{cfg.architecture} {cfg.num_layers}x{cfg.hidden_size}",
        "tokens": t,
        "cells": len(layers) * t,
        "seconds": seconds,
        "computed": outcome.stats["computed"],
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
    p.add_argument("--family", default="qwen3", choices=["qwen3", "gpt2"])
    p.add_argument("--model", help="benchmark this checkpoint folder instead of a random one")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--tokens", type=int, default=75)
    p.add_argument("--differ-at", type=int, default=2)
    p.add_argument("--hook", default="post_block")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--naive-cells", type=int, default=40)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "patchserve-bench"))
    p.add_argument("--no-transformer-lens", action="store_true")
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
