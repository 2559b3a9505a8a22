"""A bounded soak test: N clients send a mix of requests to one server for a fixed time.

Starts ``patchserve serve`` on the bundled model (or ``--model``) on a free
loopback port, or uses ``--url``. Each client loops over a fixed mix —
sweeps (plain and streamed), captures (stored, read back, dropped),
completions, tokenization, and sweeps it abandons mid-way (the server must
stop them) — while a prober times ``GET /health`` every 100 ms. Prints one
Markdown table: per kind, requests, failures by status, latency percentiles;
then ``/health`` latency and the server's memory and CPU time.

    python benchmarks/load.py --clients 8 --duration 120

Only for 127.0.0.1: every request is bounded in count by the duration.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running server (default: start one)")
    parser.add_argument("--model", help="checkpoint for the started server (default: bundled)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    args = parser.parse_args(argv)
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
