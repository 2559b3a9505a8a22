"""The GPU check: parity with ``transformers`` and side-by-side timings on one card.

For each shape — random checkpoints with Qwen3-0.6B's shape (28 x 1024, 16/8 heads
of 128, vocabulary 151,936) and a Llama-3-8B-like one (its layer shape and vocabulary,
8 of its 32 layers) — built here, no download:

1. parity: patchserve's logits against ``transformers``' on the same device and dtype
   (max |difference| of the log-probabilities, every position; target 2e-2 in bf16);
2. studies of 204, 40 and 5 tokens (all layers x all positions at ``post_block``),
   timed side by side in this process: patchserve, the batched full-forward loop on
   patchserve's runtime, a batched ``transformers`` forward-hook loop with
   ``logits_to_keep=1``, and TransformerLens' batched ``run_with_hooks`` loop as users
   run it and with ``logits_to_keep=1`` (when it imports);
   The same sweep with ``invariant=False`` (plain products) is timed beside it — the cost of
   batch invariance on the card (docs/performance.md) — and a few cells recomputed alone
   must equal the full grid's bit for bit (``bit_invariant``);
3. cells/s, and the fraction of the card's measured matmul rate (in the run's dtype)
   that patchserve reaches against the sweep's minimal FLOP count (engine/flops.py);
4. batched steered generation (``patchserve bench generate``): tokens/s of
   ``generate_batch`` against ``transformers``' batched ``generate`` with a forward hook;
   and continuous batching: 8 concurrent clients x 4 prompts (threads on one
   ``GenerationScheduler``, as the server runs them) against one 32-prompt run.

    python benchmarks/gpu.py --json gpu.json                  # on the GPU, bf16
    python benchmarks/gpu.py --device cpu --small             # the CPU check (tests/)

README.md ("Running the GPU check") says how to run it on a lent machine in one call.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from patchserve.bench.generate import compare, prompt_ids, word_tokenizer
from patchserve.bench.peers import Result, Study, transformer_lens_loops, transformers_hooks
from patchserve.bench.sweep import (
    SHAPES,
    batched_full_forward,
    build_checkpoint,
    max_diff,
    prompts,
)
from patchserve.engine.generation import GenerationRequest, GenerationScheduler, SteerVector
from patchserve.engine.metrics import Grader
from patchserve.engine.runs import capture_run
from patchserve.engine.sweep import SweepSpec, run_sweep
from patchserve.models import Transformer, load_model
from patchserve.models.invariance import sweeps_not_invariant

SMALL_SHAPES = {
    "qwen3-small": dict(family="qwen3", layers=3, width=64, vocab=300, heads=4, kv_heads=2),
    "llama-small": dict(family="llama", layers=2, width=64, vocab=300, heads=4, kv_heads=2),
}


def matmul_rate(device: str, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an n x n x n matrix product in ``dtype`` on ``device`` (best of 10)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for i in range(13):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 3:
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def parity(model: Transformer, checkpoint: Path, args: argparse.Namespace) -> float:
    """max |log p(patchserve) - log p(transformers)| over a 40-token prompt, every position."""
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=args.torch_dtype)
    hf = hf.to(args.device).eval()
    ids = torch.tensor([prompts(model.cfg.vocab_size, 40, 2)[0]], device=args.device)
    with torch.inference_mode():
        ours = model(ids)
        theirs = hf(ids).logits
    assert ours is not None
    diff = (ours.float().log_softmax(-1) - theirs.float().log_softmax(-1)).abs().max()
    del hf
    return float(diff)


def study_rows(model: Transformer, checkpoint: Path, tokens: int, args) -> list[dict]:
    """One study (all layers x all positions, post_block), every method side by side."""
    clean, corrupt = prompts(model.cfg.vocab_size, tokens, min(2, tokens - 1))
    layers = list(range(model.cfg.num_layers))
    run = capture_run(model, "clean", "", clean, {"post_block": layers})
    spec = SweepSpec(corrupt, ["post_block"], layers, list(range(tokens)), run)
    run_sweep(model, spec)  # warm-up (kernels, allocator)
    _sync(args.device)
    start = time.perf_counter()
    outcome = run_sweep(model, spec)
    _sync(args.device)
    cells = len(layers) * tokens
    results = [Result("patchserve", cells, time.perf_counter() - start)]
    with sweeps_not_invariant():  # the cost of batch invariance: the same sweep, plain products
        run_sweep(model, spec)
        _sync(args.device)
        start = time.perf_counter()
        run_sweep(model, spec)
        _sync(args.device)
    results.append(Result(PLAIN, cells, time.perf_counter() - start, "plain products"))
    invariant = bit_invariant(model, spec, outcome.grids["post_block"])
    grader = Grader("logprob", outcome.answer)
    start = time.perf_counter()
    batched_full_forward(model, corrupt, run, layers, "post_block", grader)
    _sync(args.device)
    seconds = time.perf_counter() - start
    results.append(Result("batched full forward (patchserve runtime)", cells, seconds))
    study = Study(checkpoint, clean, corrupt, layers, outcome.answer, args.device, args.torch_dtype)
    diffs = {}
    for result, grid in [transformers_hooks(study), *_transformer_lens(study)]:
        results.append(result)
        if grid is not None:
            diffs[result.name] = max_diff(outcome.grids["post_block"], grid)
    flops = int(outcome.stats["flops"])
    return [
        {
            "tokens": tokens,
            "method": r.name,
            "cells": r.cells,
            "seconds": r.seconds,
            "cells_per_second": r.cells_per_second,
            "patchserve_speedup": results[0].cells_per_second / r.cells_per_second,
            "max_abs_diff": diffs.get(r.name),
            "fraction_of_matmul_rate": flops / r.seconds / args.rate if i == 0 else None,
            "note": r.note,
            "bit_invariant": invariant if i == 0 else None,
        }
        for i, r in enumerate(results)
    ]


PLAIN = "patchserve, invariant=False"


def bit_invariant(model: Transformer, spec: SweepSpec, grid: list[list[float | None]]) -> bool:
    """Whether a few cells recomputed in a batch of their own equal the full grid's bit for
    bit on this device (what ``attribution+verify`` relies on)."""
    computed = [(i, j) for i, row in enumerate(grid) for j, v in enumerate(row) if v is not None]
    picked = computed[:: max(1, len(computed) // 5)][:5]
    only = {("post_block", spec.layers[i], spec.positions[j], None) for i, j in picked}
    alone = run_sweep(model, SweepSpec(**{**spec.__dict__, "only": only})).grids["post_block"]
    return all(alone[i][j] == grid[i][j] for i, j in picked)


def _transformer_lens(study: Study) -> list:
    try:
        return [pair for pair in transformer_lens_loops(study, 0) if pair[1] is not None]
    except Exception as exc:  # a missing dependency of TransformerLens on the GPU machine
        print(f"TransformerLens left out: {type(exc).__name__}: {exc}", file=sys.stderr)
        return []


def run_shape(name: str, shape: dict, args: argparse.Namespace) -> dict:
    checkpoint = build_checkpoint(**shape, folder=Path(args.cache_dir))
    model = load_model(checkpoint, device=args.device, dtype=args.torch_dtype).model
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    out: dict = {"shape": name, "parity_max_abs_logprob_diff": parity(model, checkpoint, args)}
    out["studies"] = [row for t in args.tokens for row in study_rows(model, checkpoint, t, args)]
    if args.device.startswith("cuda"):
        out["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    # batched steered generation against transformers' generate (patchserve bench generate)
    layer = min(4, shape["layers"] // 2)
    points = ["2x4"] if args.small else ["1x32", "8x32", "32x32", "64x32", "32x128"]
    out["generation"] = compare(checkpoint, points, args.device, args.torch_dtype, layer)
    sizes = (2, 1, 4) if args.small else (8, 4, 32)
    out["generation_clients"] = clients_row(model, layer, *sizes)
    return out


def clients_row(model: Transformer, layer: int, clients: int, per: int, tokens: int) -> dict:
    """Continuous batching: ``clients`` threads of ``per`` prompts each on one scheduler
    against one run of all the prompts (greedy, one steering vector; tokens/s)."""
    tokenizer = word_tokenizer(model.cfg.vocab_size)
    vector = torch.randn(model.cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    vector = (vector / vector.norm() * 4).to(device=model.device, dtype=model.dtype)
    steer = SteerVector(layer, "post_block", vector, 1.0)
    requests = [
        GenerationRequest(p, max_tokens=tokens, temperature=0.0, steer=[steer])
        for p in prompt_ids(clients * per, model.cfg.vocab_size)
    ]
    scheduler = GenerationScheduler(model, tokenizer)
    scheduler.run(requests[:2])  # warm-up
    device = str(model.device)
    _sync(device)
    start = time.perf_counter()
    alone = scheduler.run(requests)
    _sync(device)
    one = time.perf_counter() - start
    got: dict[int, list] = {}

    def client(i: int) -> None:
        got[i] = scheduler.run(requests[i * per : (i + 1) * per])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _sync(device)
    many = time.perf_counter() - start
    shared = [r.token_ids for i in range(clients) for r in got[i]]
    made = clients * per * tokens
    return {
        "clients": clients,
        "prompts_each": per,
        "tokens": tokens,
        "one_request_tok_s": made / one,
        "concurrent_tok_s": made / many,
        "ratio": one / many,
        "same_rows": f"{sum(a == b.token_ids for a, b in zip(shared, alone, strict=True))}/"
        f"{len(alone)}",
    }


def print_table(report: dict) -> None:
    print(f"device: {report['device']}; {report['dtype']}; matmul {report['tflops']:.1f} TFLOP/s")
    for shape in report["shapes"]:
        print(
            f"\n{shape['shape']}: parity max |dlogp| = {shape['parity_max_abs_logprob_diff']:.2e}"
        )
        print(
            "| tokens | method | cells | s | cells/s | patchserve x | % matmul | max diff "
            "| bit-invariant |"
        )
        print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
        for r in shape["studies"]:
            frac = r["fraction_of_matmul_rate"]
            pct = f"{100 * frac:.0f} %" if frac is not None else ""
            diff = f"{r['max_abs_diff']:.1e}" if r["max_abs_diff"] is not None else ""
            same = "" if r["bit_invariant"] is None else str(r["bit_invariant"]).lower()
            print(
                f"| {r['tokens']} | {r['method']} | {r['cells']} | {r['seconds']:.2f} | "
                f"{r['cells_per_second']:.0f} | {r['patchserve_speedup']:.2f}x | {pct} | {diff} "
                f"| {same} |"
            )
        print("\n| prompts x tokens | patchserve tok/s | transformers tok/s | x | same rows |")
        print("|---|---:|---:|---:|---:|")
        for g in shape["generation"]:
            print(
                f"| {g['prompts']} x {g['tokens']} | {g['patchserve_tok_s']:.0f} | "
                f"{g['transformers_tok_s']:.0f} | {g['speedup']:.2f}x | {g['same_rows']} |"
            )
        c = shape["generation_clients"]
        print(
            f"\n{c['clients']} concurrent clients x {c['prompts_each']} prompts x {c['tokens']} "
            f"tokens: {c['concurrent_tok_s']:.0f} tok/s against one request's "
            f"{c['one_request_tok_s']:.0f} ({100 * c['ratio']:.0f} %), same rows {c['same_rows']}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, help="bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--small", action="store_true", help="tiny shapes and prompts (the CPU check)")
    p.add_argument("--shapes", nargs="*", help="which shapes (default: all)")
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "patchserve-gpu"))
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.torch_dtype = getattr(torch, dtype)
    args.tokens = [12, 5] if args.small else [204, 40, 5]
    shapes = SMALL_SHAPES if args.small else SHAPES
    torch.set_grad_enabled(False)
    args.rate = matmul_rate(args.device, args.torch_dtype, 512 if args.small else 8192)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    report = {"device": name, "dtype": dtype, "tflops": args.rate / 1e12, "shapes": []}
    for key in args.shapes or list(shapes):
        report["shapes"].append(run_shape(key, shapes[key], args))
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
