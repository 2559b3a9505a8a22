"""The run store survives crashes and full disks (``server/runfiles.py``, ``server/store.py``).

A server SIGKILLed at each step of a save (the ``PATCHSERVE_TEST_CRASH_AT``
hook) restarts with every acknowledged run intact and bit-identical, no
partial run listed, no temporary file left, and the run being overwritten
either its old or its new version, whole. A save that hits a full disk
(``RLIMIT_FSIZE`` in the server process) is a 507 and changes nothing.
Bad files found at start are quarantined, never served.
"""

from __future__ import annotations

import json
import resource
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from conftest import Server, start_server
from patchserve.client.errors import InsufficientStorageError, from_error_body
from patchserve.engine.runs import CapturedRun
from patchserve.server.runfiles import CRASH_ENV, QUARANTINE, SAVE_STEPS
from patchserve.server.store import RunStore

PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The Eiffel Tower is in Paris, the capital of France.",
    "The Colosseum is in Rome, the capital of Italy.",
    "Berlin is the capital of Germany and Madrid is the capital of Spain.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Activation patching finds which activations carry a behaviour.",
]
SMALL_HOOKS = {"post_block": [1]}


def _capture(c: httpx.Client, run: str, prompt: str, **extra) -> httpx.Response:
    return c.post("/v1/patch_source", json={"run": run, "prompt": prompt, **extra})


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    return left.keys() == right.keys() and all(
        left[k].dtype == right[k].dtype and torch.equal(left[k], right[k]) for k in left
    )


def _listed(srv: Server) -> dict[str, str]:
    with srv.client() as c:
        return {m["run"]: m["prompt"] for m in c.get("/v1/patch_source").json()["data"]}


def test_a_save_killed_at_any_step_leaves_the_old_run_or_the_new_one_whole(
    server_checkpoint: Path, tmp_path: Path
):
    folder = tmp_path / "runs"
    srv = start_server(server_checkpoint, "--source-dir", str(folder))
    try:
        with srv.client() as c:
            for i, prompt in enumerate(PROMPTS[1:], start=1):  # what each overwrite will write
                assert _capture(c, f"ref-{i}", prompt).status_code == 200
            assert _capture(c, "b", PROMPTS[0]).status_code == 200
            served = c.get(
                "/v1/patch_source/ref-1",
                params={"include": "activations", "hook": "attn_head", "layer": 2},
            ).json()["activations"]
    finally:
        srv.stop()
    acked = {p.name: _tensors(p) for p in folder.glob("*.safetensors")}
    prompts = {f"ref-{i}": p for i, p in enumerate(PROMPTS[1:], start=1)} | {"b": PROMPTS[0]}

    def check(srv: Server, step: str) -> None:
        assert _listed(srv) == prompts, step
        assert not list(folder.glob(".*.tmp")), step
        on_disk = {p.name: _tensors(p) for p in folder.glob("*.safetensors")}
        assert on_disk.keys() == acked.keys(), step
        assert all(_same(on_disk[name], acked[name]) for name in acked), step
        with srv.client() as c:  # served bytes too, not only the file's
            again = c.get(
                "/v1/patch_source/ref-1",
                params={"include": "activations", "hook": "attn_head", "layer": 2},
            ).json()["activations"]
        assert again == served, step

    # Each server checks what the previous crash left, then crashes at the next step.
    previous = "none"
    for version, step in enumerate(SAVE_STEPS, start=1):
        srv = start_server(server_checkpoint, "--source-dir", str(folder), env={CRASH_ENV: step})
        check(srv, previous)
        with srv.client() as c, pytest.raises(httpx.TransportError):
            _capture(c, "b", PROMPTS[version], overwrite=True)
        assert srv.process.wait(10) == -signal.SIGKILL, step
        leftovers = list(folder.glob(".*.tmp"))
        assert bool(leftovers) == (step in ("torn", "written", "synced")), step
        if step in ("renamed", "dir_synced"):  # past the rename: the new version, whole
            acked["b.safetensors"] = acked[f"ref-{version}.safetensors"]
            prompts["b"] = PROMPTS[version]
        previous = step
    last = start_server(server_checkpoint, "--source-dir", str(folder))
    try:
        check(last, previous)
    finally:
        last.stop()


def _file_size_limit(limit: int) -> Callable[[], None]:
    def limit_file_size() -> None:  # runs in the server process before it starts
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: EFBIG, not death
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_file_size


def test_a_full_disk_is_a_507_and_the_store_holds_what_it_held(
    server_checkpoint: Path, tmp_path: Path
):
    folder = tmp_path / "runs"
    srv = start_server(
        server_checkpoint, "--source-dir", str(folder), preexec_fn=_file_size_limit(100_000)
    )
    prompt = PROMPTS[0]
    try:
        with srv.client() as c:
            assert _capture(c, "small", prompt, hooks=SMALL_HOOKS).status_code == 200
            before = c.get("/v1/patch_source/small").json()
            attempts = [
                _capture(c, "small", prompt, overwrite=True),  # all hooks: ~230 kB
                _capture(c, "big", prompt),
                c.post(
                    "/v1/patch_sweep",
                    json={
                        "prompt": prompt.replace("Mary", "Mari"),
                        "clean_prompt": prompt,
                        "source_run": "swept",
                        "keep_source": True,
                        "layers": "all",
                    },
                ),
                c.post(
                    "/v1/completions",
                    json={
                        "prompt": prompt,
                        "max_tokens": 1,
                        "capture": {"patch_source": {"run": "gen"}},
                    },
                ),
            ]
            for r in attempts:
                assert r.status_code == 507, r.text
                error = r.json()["error"]
                assert error["type"] == "insufficient_storage" and "nothing" in error["message"]
                assert isinstance(from_error_body(r.json(), 507), InsufficientStorageError)
            assert _listed(srv) == {"small": prompt}
            assert c.get("/v1/patch_source/small").json() == before
            assert c.get("/v1/patch_source/big").status_code == 404
            assert not list(folder.glob(".*.tmp"))
            assert _capture(c, "small-2", prompt, hooks=SMALL_HOOKS).status_code == 200
    finally:
        srv.stop()
    assert sorted(p.name for p in folder.iterdir()) == ["small-2.safetensors", "small.safetensors"]


def _run(name: str) -> CapturedRun:
    acts = {("post_block", 0): torch.randn(2, 8), ("attn_head", 1): torch.randn(2, 2, 4)}
    run = CapturedRun(name, "p", [1, 2], [0, 1], acts, torch.randn(5))
    run.kept = True
    return run


def test_leftovers_are_removed_and_bad_files_quarantined_at_start(tmp_path: Path, caplog):
    store = RunStore(budget_bytes=10**9, source_dir=tmp_path)
    for name in ("good", "torn", "renamed"):
        store.put(_run(name))
    whole = (tmp_path / "torn.safetensors").read_bytes()
    (tmp_path / "torn.safetensors").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "renamed.safetensors").rename(tmp_path / "other.safetensors")
    (tmp_path / ".good.x1y2.tmp").write_bytes(whole[:100])
    (tmp_path / "legacy.json").write_text(json.dumps({"prompt": "p"}))

    reloaded = RunStore(budget_bytes=10**9, source_dir=tmp_path)
    assert reloaded.names() == ["good"]
    assert torch.equal(
        reloaded.get("good").activations["post_block", 0],
        store.get("good").activations["post_block", 0],
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.safetensors", QUARANTINE]
    quarantined = sorted(p.name.split(".")[0] for p in (tmp_path / QUARANTINE).iterdir())
    assert quarantined == ["legacy", "other", "torn"]
    assert sum("quarantining" in r.message for r in caplog.records) == 3
