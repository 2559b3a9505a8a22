"""The event loop stays free: saving a 200 MB run does not stall ``/health``."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from checkpoints import CORPUS, build_checkpoint
from conftest import start_server

HEALTH_BUDGET_S = 0.1


def _long_prompt(client: httpx.Client, tokens: int) -> str:
    words = " ".join(CORPUS[:6]).split()
    prompt = ""
    for word in words * 10:
        candidate = f"{prompt} {word}".strip()
        if client.post("/tokenize", json={"prompt": candidate}).json()["count"] > tokens:
            return prompt
        prompt = candidate
    return prompt


def _health_latencies(url: str, busy: threading.Event) -> list[float]:
    latencies = []
    with httpx.Client(base_url=url, timeout=10) as c:
        while busy.is_set():
            start = time.perf_counter()
            assert c.get("/health").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.01)
    return latencies


def test_health_answers_fast_while_a_200_mb_run_is_saved(checkpoint_root: Path, tmp_path: Path):
    folder = build_checkpoint("qwen3_wide", checkpoint_root)
    srv = start_server(folder, "--source-dir", str(tmp_path / "runs"))
    try:
        with srv.client() as c:
            prompt = _long_prompt(c, 256)
            busy, answer = threading.Event(), {}
            busy.set()

            def capture() -> None:
                try:
                    answer["r"] = c.post("/v1/patch_source", json={"run": "big", "prompt": prompt})
                finally:
                    busy.clear()

            worker = threading.Thread(target=capture)
            worker.start()
            latencies = _health_latencies(srv.url, busy)
            worker.join()
            assert answer["r"].status_code == 200, answer["r"].text
            assert answer["r"].json()["bytes"] >= 200e6
            assert len(latencies) >= 5, "the save finished before /health was asked"
            assert max(latencies) < HEALTH_BUDGET_S, sorted(latencies)[-5:]
            assert (tmp_path / "runs" / "big.safetensors").stat().st_size >= 200e6
    finally:
        srv.stop()
