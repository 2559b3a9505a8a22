"""A bounded soak test: N clients send a mix of requests to one server for a fixed time.

Starts ``patchserve serve`` on the bundled model (or ``--model``) on a free
loopback port, or uses ``--url``. Each client loops over a fixed mix —
sweeps (plain and streamed), captures (stored, read back, dropped),
completions, tokenization, and sweeps it abandons mid-way (the server must
stop them) — while a prober times ``GET /health`` every 100 ms. Prints one
Markdown table: per kind, requests, failures by status, latency percentiles;
then ``/health`` latency and the server's memory and CPU time.

    python benchmarks/load.py --clients 8 --duration 120

Two timed cases on ``patchserve bench generate``'s checkpoint (Qwen3-shaped 8 x 512, random,
served with a word-level tokenizer so that prompts are exact token ids), each side by side
in one server, best of ``--repeat``:

* ``--generate``: continuous batching across clients — one request of ``C x P`` prompts
  against ``C`` concurrent clients of ``P`` prompts each (greedy, one steering vector, the
  same prompts and lengths): tokens/s of each and their ratio;
* ``--mixed``: a sweep sent during a long multi-prompt generation, and a generation sent
  during a long sweep, each against its time alone.

    python benchmarks/load.py --generate --clients 8 --prompts 4 --tokens 32
    python benchmarks/load.py --mixed

Only for 127.0.0.1: every request is bounded in count by the duration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mari and John went to the store, John gave a drink to"
MIX = ("sweep", "completion", "capture", "sweep_stream", "tokenize", "abandon", "sweep")


@dataclass
class Results:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    failures: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))

    def record(self, kind: str, seconds: float, status: int | str) -> None:
        if status == 200:
            self.latencies[kind].append(seconds)
        else:
            self.failures[kind][status] += 1


def _sweep(stream: bool = False, positions: object = (3, 5, 7), hook: str = "post_block") -> dict:
    return {
        "prompt": CORRUPT,
        "clean_prompt": CLEAN,
        "hook": hook,
        "layers": "all",
        "positions": list(positions) if not isinstance(positions, str) else positions,
        "metric": "logit_diff",
        "answer_token": " Mary",
        "foil_token": " John",
        "stream": stream,
    }


BIG_SWEEP = {**_sweep(positions="all_prompt", hook="attn_head"), "heads": "all"}  # ~1 s alone


async def _one(client: httpx.AsyncClient, kind: str, tag: str) -> int | str:
    """Run one request of ``kind``; its status (200 when every step succeeded)."""
    if kind == "sweep":
        return (await client.post("/v1/patch_sweep", json=_sweep())).status_code
    if kind == "sweep_stream":
        async with client.stream("POST", "/v1/patch_sweep", json=_sweep(stream=True)) as r:
            text = "".join([chunk async for chunk in r.aiter_text()])
        return r.status_code if '"type":"summary"' in text.replace(" ", "") else "no summary"
    if kind == "completion":
        body = {"prompt": CLEAN, "max_tokens": 8, "temperature": 0}
        return (await client.post("/v1/completions", json=body)).status_code
    if kind == "tokenize":
        return (await client.post("/tokenize", json={"prompt": CLEAN})).status_code
    if kind == "capture":
        body = {"run": tag, "prompt": CLEAN, "hooks": {"post_block": "all"}}
        for step in (
            client.post("/v1/patch_source", json=body),
            client.get(f"/v1/patch_source/{tag}"),
            client.delete(f"/v1/patch_source/{tag}"),
        ):
            status = (await step).status_code
            if status != 200:
                return status
        return 200
    if kind == "abandon":  # leave a big sweep after 0.1 s: the server must drop the work
        try:
            await asyncio.wait_for(
                client.post("/v1/patch_sweep", json=BIG_SWEEP),
                0.1,
            )
        except TimeoutError:
            return 200
        return 200
    raise ValueError(kind)


async def _client(url: str, index: int, deadline: float, results: Results) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        n = 0
        while time.monotonic() < deadline:
            kind = MIX[(index + n) % len(MIX)]
            start = time.perf_counter()
            try:
                status = await _one(client, kind, f"load-{index}-{n}")
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            results.record(kind, time.perf_counter() - start, status)
            n += 1


async def _prober(url: str, deadline: float, results: Results) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while time.monotonic() < deadline:
            start = time.perf_counter()
            try:
                status = (await client.get("/health")).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            results.record("health", time.perf_counter() - start, status)
            await asyncio.sleep(0.1)


async def _run(url: str, clients: int, seconds: float) -> Results:
    results = Results()
    deadline = time.monotonic() + seconds
    tasks = [_client(url, i, deadline, results) for i in range(clients)]
    await asyncio.gather(_prober(url, deadline, results), *tasks)
    return results


def _memory_kib(pid: int) -> dict[str, int]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in lines) if k[:2] == "Vm"}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_server(model: str | None, threads: int) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source_dir = tempfile.mkdtemp(prefix="patchserve-load-")
    args = [sys.executable, "-m", "patchserve.cli.main", "serve", "--port", str(port)]
    args += ["--source-dir", source_dir, "--threads", str(threads), "--log-level", "warning"]
    if model:
        args += ["--model", model]
    process = subprocess.Popen(args)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


def table(results: Results, seconds: float) -> str:
    rows = [
        "| kind | ok | failed | per s | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    kinds = sorted(set(results.latencies) | set(results.failures), key=lambda k: k == "health")
    for kind in kinds:
        ok = results.latencies.get(kind, [])
        failed = results.failures.get(kind, Counter())
        failures = ", ".join(f"{n} x {s}" for s, n in failed.items()) or "0"
        rows.append(
            f"| {kind} | {len(ok)} | {failures} | {len(ok) / seconds:.2f} | "
            f"{_pct(ok, 0.5):.0f} | {_pct(ok, 0.95):.0f} | {_pct(ok, 0.99):.0f} | "
            f"{(max(ok) * 1000 if ok else 0):.0f} |"
        )
    return "\n".join(rows)


def served_bench_checkpoint() -> str:
    """``patchserve bench generate``'s checkpoint with a word-level tokenizer (``w<id>``)."""
    from patchserve.bench.generate import word_tokenizer
    from patchserve.bench.sweep import build_checkpoint

    folder = Path(tempfile.gettempdir()) / "patchserve-bench"
    path = build_checkpoint("qwen3", 8, 512, 32000, folder)
    served = folder / f"served-{path.name}"
    if not (served / "tokenizer.json").exists():
        served.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.safetensors"):
            if not (served / name).exists():
                (served / name).symlink_to(path / name)
        word_tokenizer(32000).hf.save_pretrained(served)
    return str(served)


def _words(count: int, seed: int) -> list[str]:
    from patchserve.bench.generate import prompt_ids

    return [" ".join(f"w{i}" for i in ids) for ids in prompt_ids(count, 32000, seed)]


def _steer() -> dict:
    """``patchserve bench generate``'s vector: random, norm 4, at layer 4's ``post_block``."""
    import base64

    import torch

    vector = torch.randn(512, generator=torch.Generator().manual_seed(1))
    data = (vector / vector.norm() * 4).numpy().astype("float32").tobytes()
    return {
        "steer": [{"layer": 4, "hook": "post_block", "source_inline": 0, "scale": 1.0}],
        "patch_vectors": {
            "dtype": "float32",
            "shape": [1, 512],
            "data": base64.b64encode(data).decode(),
        },
    }


async def _generate(client: httpx.AsyncClient, prompts: list[str], tokens: int) -> float:
    """Seconds of one greedy steered completion of ``prompts``; checks every token came."""
    body = {"prompt": prompts, "max_tokens": tokens, "temperature": 0, **_steer()}
    start = time.perf_counter()
    r = await client.post("/v1/completions", json=body)
    seconds = time.perf_counter() - start
    r.raise_for_status()
    assert r.json()["usage"]["completion_tokens"] == len(prompts) * tokens
    return seconds


async def _steps(client: httpx.AsyncClient) -> float:
    """The server's decoding passes so far (``/metrics``)."""
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith("patchserve_generation_steps "):
            return float(line.split()[1])
    return 0.0


async def _clients_case(url: str, clients: int, per: int, tokens: int, repeat: int) -> dict:
    prompts = _words(clients * per, 0)
    made = clients * per * tokens
    one, many, steps = [], [], []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await _generate(client, prompts[:2], 4)  # warm-up
        for _ in range(repeat):  # interleaved: both sides see the same machine load
            before = await _steps(client)
            one.append(made / await _generate(client, prompts, tokens))
            middle = await _steps(client)
            start = time.perf_counter()
            parts = [prompts[i * per : (i + 1) * per] for i in range(clients)]
            await asyncio.gather(*[_generate(client, p, tokens) for p in parts])
            many.append(made / (time.perf_counter() - start))
            steps.append((middle - before, await _steps(client) - middle))
    pairs = sorted(b / a for a, b in zip(one, many, strict=True))
    return {
        "one_request_tok_s": max(one),
        "concurrent_tok_s": max(many),
        "ratio": max(many) / max(one),
        "median_pair_ratio": statistics.median(pairs),
        "all_one": one,
        "all_concurrent": many,
        "decoding_passes_one_vs_concurrent": steps,
    }


def _bench_sweep(tokens: int, hook: str) -> dict:
    """A sweep of every layer and position of a ``tokens``-token prompt pair (the prompts
    differ at their third token) at ``hook``."""
    import torch

    ids = torch.randint(2, 32000, (tokens,), generator=torch.Generator().manual_seed(7)).tolist()
    clean = " ".join(f"w{i}" for i in ids)
    corrupt = " ".join(f"w{i}" for i in [*ids[:2], (ids[2] + 1) % 32000, *ids[3:]])
    body = {"prompt": corrupt, "clean_prompt": clean, "hook": hook, "answer_token_id": 5}
    return {**body, "layers": "all", "positions": "all_prompt"}


async def _timed(coro: Any) -> float:
    start = time.perf_counter()
    await coro
    return time.perf_counter() - start


async def _sweep(client: httpx.AsyncClient, body: dict) -> None:
    (await client.post("/v1/patch_sweep", json=body)).raise_for_status()


async def _during(background: Any, foreground: Any, lead: float) -> tuple[float, float]:
    """Seconds of ``foreground`` sent ``lead`` s into ``background``, and of the background."""
    task = asyncio.create_task(_timed(background))
    await asyncio.sleep(lead)
    seconds = await _timed(foreground)
    return seconds, await task


async def _mixed_case(url: str, repeat: int) -> dict:
    short_sweep = _bench_sweep(20, "post_block")  # 8 layers x 20 positions
    long_sweep = {**_bench_sweep(24, "attn_head"), "heads": [0, 1, 2, 3]}  # 8 x 24 x 4 heads
    long_gen = _words(8, 3)
    short_gen = _words(4, 4)
    out: dict[str, list[float]] = defaultdict(list)
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        await _sweep(c, short_sweep)  # warm-up
        await _generate(c, short_gen, 4)
        for _ in range(repeat):
            out["sweep_alone"].append(await _timed(_sweep(c, short_sweep)))
            out["long_generation_alone"].append(await _timed(_generate(c, long_gen, 200)))
            sweep, _ = await _during(_generate(c, long_gen, 200), _sweep(c, short_sweep), 1.0)
            out["sweep_during_generation"].append(sweep)
            out["generation_alone"].append(await _timed(_generate(c, short_gen, 32)))
            out["long_sweep_alone"].append(await _timed(_sweep(c, long_sweep)))
            gen, _ = await _during(_sweep(c, long_sweep), _generate(c, short_gen, 32), 0.5)
            out["generation_during_sweep"].append(gen)
    best = {k: min(v) for k, v in out.items()}
    best["sweep_ratio"] = best["sweep_during_generation"] / best["sweep_alone"]
    best["generation_ratio"] = best["generation_during_sweep"] / best["generation_alone"]
    return {"best_s": best, "all_s": dict(out)}


def timed_cases(args: argparse.Namespace) -> int:
    """``--generate`` / ``--mixed``: on a server of bench generate's checkpoint."""
    model = served_bench_checkpoint()
    process, url = (None, args.url) if args.url else _start_server(model, args.threads)
    try:
        report: dict[str, Any] = {"threads": args.threads, "load": os.getloadavg()[0]}
        if args.generate:
            case = asyncio.run(
                _clients_case(url, args.clients, args.prompts, args.tokens, args.repeat)
            )
            report["clients"] = case
            print(
                f"{args.clients * args.prompts} prompts x {args.tokens} tokens: one request "
                f"{case['one_request_tok_s']:.0f} tok/s; {args.clients} concurrent clients x "
                f"{args.prompts} prompts {case['concurrent_tok_s']:.0f} tok/s "
                f"(best of each {100 * case['ratio']:.0f} %, median of the interleaved pairs "
                f"{100 * case['median_pair_ratio']:.0f} %)"
            )
        if args.mixed:
            report["mixed"] = asyncio.run(_mixed_case(url, args.repeat))
            b = report["mixed"]["best_s"]
            print(
                f"sweep alone {b['sweep_alone']:.3f} s, during an 8 x 200 generation "
                f"{b['sweep_during_generation']:.3f} s ({b['sweep_ratio']:.2f}x); generation "
                f"4 x 32 alone {b['generation_alone']:.3f} s, during a long sweep "
                f"({b['long_sweep_alone']:.2f} s alone) {b['generation_during_sweep']:.3f} s "
                f"({b['generation_ratio']:.2f}x)"
            )
        report["load_after"] = os.getloadavg()[0]
        print(json.dumps(report, indent=2))
        return 0
    finally:
        if process:
            process.terminate()
            process.wait(60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running server (default: start one)")
    parser.add_argument("--model", help="checkpoint for the started server (default: bundled)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument("--generate", action="store_true", help="the concurrent clients case")
    parser.add_argument("--mixed", action="store_true", help="sweeps and generations mixed")
    parser.add_argument("--prompts", type=int, default=4, help="--generate: prompts a client")
    parser.add_argument("--tokens", type=int, default=32, help="--generate: tokens a prompt")
    parser.add_argument("--repeat", type=int, default=3, help="timed cases: best of")
    args = parser.parse_args(argv)
    if args.generate or args.mixed:
        return timed_cases(args)
    process, url = (None, args.url) if args.url else _start_server(args.model, args.threads)
    try:
        before = _memory_kib(process.pid) if process else {}
        cpu_before = _cpu_seconds(process.pid) if process else 0.0
        results = asyncio.run(_run(url, args.clients, args.duration))
        print(f"{args.clients} clients x {args.duration:.0f} s against {url}\n")
        print(table(results, args.duration))
        health = results.latencies.get("health", [])
        if health:
            print(f"\n/health: median {statistics.median(health) * 1000:.1f} ms")
        if process:
            after = _memory_kib(process.pid)
            cpu = _cpu_seconds(process.pid) - cpu_before
            time.sleep(2.0)
            idle = _cpu_seconds(process.pid) - cpu_before - cpu
            print(
                f"server RSS {before['VmRSS'] / 1024:.0f} -> {after['VmRSS'] / 1024:.0f} MiB "
                f"(peak {after['VmHWM'] / 1024:.0f} MiB); CPU {cpu:.0f} s in "
                f"{args.duration:.0f} s; {idle:.2f} s CPU in the 2 s after the clients stopped"
            )
        failed = sum(sum(c.values()) for c in results.failures.values())
        return 1 if failed else 0
    finally:
        if process:
            process.terminate()
            process.wait(60)


if __name__ == "__main__":
    sys.exit(main())
