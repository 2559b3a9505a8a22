"""SIGTERM: no new connections, requests in flight finish, work past the grace period
stops with a 503, and the process ends soon after the grace period — by re-raising
the SIGTERM once shut down, as uvicorn does, so a supervisor sees why it ended."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import httpx

from checkpoints import CORPUS, build_checkpoint
from conftest import start_server

GRACE_S = 6.0


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_sigterm_finishes_short_requests_then_stops_long_ones(
    checkpoint_root: Path, tmp_path: Path
):
    log = tmp_path / "server.log"
    folder = build_checkpoint("qwen3_wide", checkpoint_root)
    # small batches: the short request waits at the gate for one short batch at most
    srv = start_server(
        folder, "--shutdown-grace", str(GRACE_S), "--max-batch-tokens", "256", log=log
    )
    port = int(srv.url.rsplit(":", 1)[1])
    prompt = " ".join(CORPUS[2:5])  # about 50 tokens
    long_sweep = {
        "prompt": prompt,
        "clean_prompt": prompt.replace("Mary", "Mari"),
        "hooks": ["post_block", "mlp_out", "attn_out"],
        "layers": "all",
    }
    short = {"prompt": CORPUS[0], "max_tokens": 2, "temperature": 0}
    answers: dict[str, httpx.Response] = {}

    def post(name: str, path: str, body: dict) -> None:
        with srv.client() as c:
            answers[name] = c.post(path, json=body)

    try:
        slow = threading.Thread(target=post, args=("long", "/v1/patch_sweep", long_sweep))
        slow.start()
        time.sleep(2.0)  # the sweep is computing
        quick = threading.Thread(target=post, args=("short", "/v1/completions", short))
        quick.start()
        time.sleep(0.3)
        srv.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.5)
        assert _refused(port), "a new connection was accepted after SIGTERM"
        quick.join(GRACE_S + 5)
        slow.join(GRACE_S + 5)
        code = srv.process.wait(GRACE_S + 5)
        took = time.monotonic() - signalled
    finally:
        if srv.process.poll() is None:
            srv.process.kill()
    assert answers["short"].status_code == 200, answers["short"].text
    assert len(answers["short"].json()["choices"][0]["token_ids"]) == 2
    stopped = answers["long"]
    assert stopped.status_code == 503, stopped.text
    assert stopped.json()["error"]["type"] == "service_unavailable"
    assert code == -signal.SIGTERM
    assert "accepting no new connections" in log.read_text()
    assert GRACE_S - 0.5 < took < GRACE_S + 3, took
