"""Every request has an id, echoed to the client and on each of its server log lines."""

from __future__ import annotations

import re
import time

from conftest import start_server


def test_request_ids_tag_the_answer_and_the_log(server_checkpoint, tmp_path):
    log = tmp_path / "server.log"
    srv = start_server(server_checkpoint, "--log-level", "info", log=log)
    try:
        with srv.client() as c:
            body = {"prompt": "The capital of Italy is", "clean_prompt": "The capital of Spain is"}
            given = c.post(
                "/v1/patch_sweep", json={**body, "layers": [0]}, headers={"X-Request-Id": "abc-123"}
            )
            fresh = c.post("/v1/patch_sweep", json={**body, "layers": [1]})
            odd = c.get("/health", headers={"X-Request-Id": "no spaces allowed"})
    finally:
        srv.stop()
    assert given.status_code == 200 and given.headers["x-request-id"] == "abc-123"
    assert re.fullmatch(r"[0-9a-f]{16}", fresh.headers["x-request-id"])
    assert re.fullmatch(r"[0-9a-f]{16}", odd.headers["x-request-id"])  # not echoed verbatim
    deadline = time.time() + 5
    while "[abc-123]" not in log.read_text() and time.time() < deadline:
        time.sleep(0.1)
    lines = log.read_text().splitlines()
    tagged = [line for line in lines if "[abc-123]" in line]
    assert any(
        "INFO patchserve.server [abc-123] sweep post_block logprob" in line for line in tagged
    )
    assert any(f"[{fresh.headers['x-request-id']}] sweep" in line for line in lines)
