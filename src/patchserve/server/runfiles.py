"""One persisted run = one file, ``NAME.safetensors``, its manifest in the header metadata.

Saving is crash-safe (``write_temp`` then ``commit``): the run is written to
``.NAME.<random>.tmp`` in the same folder and fsynced, then renamed over
``NAME.safetensors`` once, then the folder is fsynced. A crash at any point
leaves the old file or the new one, whole, and perhaps a temporary file.

``scan_folder`` runs at start: it removes temporary files, checks every run
file's header against the manifest inside it (run name, tensor names, shapes
and dtypes; safetensors itself checks the file length) and moves a file that
fails, or an orphan ``NAME.json`` of the old two-file format, to
``quarantine/`` with a logged warning; those are never served. Loading a run
re-checks its tensors.

Fault injection, for the crash tests only: with the environment variable
``PATCHSERVE_TEST_CRASH_AT=STEP`` the process SIGKILLs itself at that step
of every save — ``torn`` (the temporary file cut to half its length),
``written``, ``synced``, ``renamed``, ``dir_synced``. Unset, it costs one
dictionary lookup per step.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from patchserve.engine.runs import NAME, CapturedRun

log = logging.getLogger("patchserve.store")

MANIFEST_KEY = "patchserve.manifest"
LOGITS_KEY = "__last_logits__"
SUFFIX = ".safetensors"
QUARANTINE = "quarantine"
CRASH_ENV = "PATCHSERVE_TEST_CRASH_AT"
SAVE_STEPS = ("torn", "written", "synced", "renamed", "dir_synced")
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class RunFileError(Exception):
    """A file that is not a whole, consistent run."""


def run_path(folder: Path, name: str) -> Path:
    return folder / f"{name}{SUFFIX}"


def _crash_point(step: str, tmp: Path | None = None) -> None:
    if os.environ.get(CRASH_ENV) != step:
        return
    if tmp is not None:  # a torn write: the process died with half the bytes on disk
        os.truncate(tmp, tmp.stat().st_size // 2)
    os.kill(os.getpid(), signal.SIGKILL)


def _tensors(run: CapturedRun) -> dict[str, torch.Tensor]:
    tensors = {
        f"{hook}/{layer}": t.contiguous().cpu() for (hook, layer), t in run.activations.items()
    }
    if run.last_logits is not None:
        tensors[LOGITS_KEY] = run.last_logits.contiguous().cpu()
    return tensors


def _layout(shapes: dict[str, tuple[str, list[int]]]) -> dict[str, list[Any]]:
    return {key: [dtype, list(shape)] for key, (dtype, shape) in sorted(shapes.items())}


def _dtype_tag(t: torch.Tensor) -> str:
    return next(tag for tag, dtype in SAFETENSORS_DTYPES.items() if dtype == t.dtype)


def write_temp(folder: Path, run: CapturedRun) -> tuple[Path, dict[str, Any]]:
    """The run written and fsynced under a temporary name in ``folder``, and its manifest
    (``OSError`` or ``SafetensorError`` when it cannot be; nothing is left behind then)."""
    tensors = _tensors(run)
    manifest = {
        "run": run.name,
        "prompt": run.prompt,
        "token_ids": run.token_ids,
        "positions": run.positions,
        "created": run.created,
        "tensors": _layout({k: (_dtype_tag(t), list(t.shape)) for k, t in tensors.items()}),
    }
    fd, name = tempfile.mkstemp(dir=folder, prefix=f".{run.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        save_file(tensors, str(tmp), metadata={MANIFEST_KEY: json.dumps(manifest)})
        _crash_point("torn", tmp)
        _crash_point("written")
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        _crash_point("synced")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, manifest


def commit(tmp: Path, path: Path) -> None:
    """Rename the written run into place (atomic), then make the rename durable."""
    os.replace(tmp, path)
    _crash_point("renamed")
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # the rename is done and visible; only its durability is in doubt
        log.warning("could not fsync %s after saving %s", path.parent, path.name, exc_info=True)
    _crash_point("dir_synced")


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a run file, checked against the file's own header."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            header = {
                key: (handle.get_slice(key).get_dtype(), handle.get_slice(key).get_shape())
                for key in handle.keys()  # noqa: SIM118 - safe_open is not a Mapping
            }
        manifest = json.loads(metadata[MANIFEST_KEY])
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise RunFileError(f"unreadable run file: {exc}") from exc
    if manifest.get("run") != path.name.removesuffix(SUFFIX):
        raise RunFileError(f"the manifest names run {manifest.get('run')!r}")
    if manifest.get("tensors") != _layout(header):
        raise RunFileError("the tensors in the file differ from those its manifest lists")
    if any(dtype not in SAFETENSORS_DTYPES for dtype, _ in header.values()):
        raise RunFileError("a tensor has a dtype runs never have")
    return manifest


def load_run(path: Path, manifest: dict[str, Any], header_only: bool = False) -> CapturedRun:
    """The persisted run; ``header_only`` gives meta tensors (shapes and dtypes alone),
    enough for its manifest without reading the activations."""
    if header_only:
        tensors = {
            key: torch.empty(shape, dtype=SAFETENSORS_DTYPES[dtype], device="meta")
            for key, (dtype, shape) in manifest["tensors"].items()
        }
    else:
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise RunFileError(f"unreadable run file: {exc}") from exc
        found = {k: (_dtype_tag(t), list(t.shape)) for k, t in tensors.items()}
        if _layout(found) != manifest["tensors"]:
            raise RunFileError("the tensors in the file differ from those its manifest lists")
    logits = tensors.pop(LOGITS_KEY, None)
    activations = {}
    for key, value in tensors.items():
        hook, _, layer = key.rpartition("/")
        activations[hook, int(layer)] = value
    return CapturedRun(
        name=manifest["run"],
        prompt=manifest["prompt"],
        token_ids=list(manifest["token_ids"]),
        positions=list(manifest["positions"]),
        activations=activations,
        last_logits=logits,
        created=float(manifest.get("created", 0.0)),
        kept=True,
    )


def quarantine(path: Path, reason: str) -> None:
    """Move a bad run file out of the store's sight (kept for inspection, never served)."""
    target = path.parent / QUARANTINE / f"{path.name}.{int(time.time() * 1000)}"
    log.warning("quarantining %s (%s) as %s", path.name, reason, target)
    try:
        target.parent.mkdir(exist_ok=True)
        os.replace(path, target)
    except OSError:
        log.exception("could not quarantine %s; removing it", path)
        path.unlink(missing_ok=True)


def scan_folder(folder: Path) -> dict[str, dict[str, Any]]:
    """Clean ``folder`` after a crash and return the manifests of its whole runs."""
    for leftover in folder.glob(".*.tmp"):
        log.warning("removing %s, a save that never completed", leftover.name)
        leftover.unlink(missing_ok=True)
    runs = {}
    for path in sorted(folder.glob(f"*{SUFFIX}")):
        name = path.name.removesuffix(SUFFIX)
        if not NAME.match(name):
            continue  # not a file this server wrote
        try:
            runs[name] = read_manifest(path)
        except RunFileError as exc:
            quarantine(path, str(exc))
    for orphan in folder.glob("*.json"):  # the old two-file format, or its half
        quarantine(orphan, "a manifest file apart from its run (runs carry their own now)")
    return runs
