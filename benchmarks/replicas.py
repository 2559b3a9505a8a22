"""One sweep in one process against the same sweep spread over N Ray actors (side by side).

    python benchmarks/replicas.py                     # the bench's 8 x 512 model, 78 tokens
    python benchmarks/replicas.py --replicas 2 --threads 2

The one-process sweep uses ``--threads`` torch threads; each of the N actors one
thread (one CPU of a local Ray cluster of ``--replicas`` CPUs). It checks that the
grids are equal bit for bit to a one-thread one-process sweep (as the actors run; a
different thread count changes float rounding in the matrix products) and prints both times.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import ray
import torch

from patchserve.bench.sweep import build_checkpoint, max_diff, prompts
from patchserve.engine.replicas import ReplicaPool
from patchserve.engine.runs import capture_run
from patchserve.engine.sweep import SweepSpec, run_sweep
from patchserve.models import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--tokens", type=int, default=78)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "patchserve-bench"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = build_checkpoint("qwen3", 8, 512, 32768, Path(args.cache_dir))
    model = load_model(checkpoint).model
    clean, corrupt = prompts(model.cfg.vocab_size, args.tokens, 2)
    layers = list(range(model.cfg.num_layers))
    run = capture_run(model, "clean", "", clean, {"post_block": layers})
    spec = SweepSpec(corrupt, ["post_block"], layers, list(range(args.tokens)), run)
    ray.init(num_cpus=args.replicas, include_dashboard=False)
    pool = ReplicaPool(str(checkpoint), args.replicas, threads=1)
    pool.run_sweep(model, spec)  # warm-up: the actors' first sweep
    times: dict[str, float] = {}
    grids: dict[str, dict] = {}
    for _ in range(args.repeat):
        for name, sweep in (("one process", run_sweep), ("replicas", pool.run_sweep)):
            start = time.perf_counter()
            outcome = sweep(model, spec)
            times[name] = min(times.get(name, float("inf")), time.perf_counter() - start)
            grids[name] = outcome.grids
    torch.set_num_threads(1)
    assert run_sweep(model, spec).grids == grids["replicas"], "grids differ"
    diff = max_diff(grids["one process"]["post_block"], grids["replicas"]["post_block"])
    one, many = times["one process"], times["replicas"]
    print(f"{len(layers) * args.tokens} cells, {args.tokens} tokens, load {os.getloadavg()}")
    print(f"one process ({args.threads} threads): {one:.2f} s")
    print(f"{args.replicas} Ray actors (1 thread each): {many:.2f} s; speed-up {one / many:.2f}x")
    print(f"grids equal bit for bit to one thread in one process; {diff:.1e} from {args.threads}")


if __name__ == "__main__":
    main()
