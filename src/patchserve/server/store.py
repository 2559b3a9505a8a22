"""The source store: captured runs under a byte budget, leased while in use.

Whole-run LRU: when the resident runs exceed the budget, the least recently
used run that no in-flight request holds is evicted (a kept run that was
persisted stays on disk and is reloaded on its next use). ``drop`` always
wins, leased or not — the request holding it keeps its own reference and
finishes with the data it has.

With a ``source_dir``, kept runs are written as ``NAME.safetensors`` +
``NAME.json`` (each written to a temporary file and renamed, so a crash never
leaves half a run) and reloaded at start. Names are validated
(``check_run_name``), so nothing a request says reaches outside the folder.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from patchserve.engine.runs import CapturedRun, check_run_name
from patchserve.errors import Conflict, InvalidArgument
from patchserve.wire.runs import RunManifest

LOGITS_KEY = "__last_logits__"
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class RunStore:
    def __init__(self, budget_bytes: int, source_dir: Path | None = None) -> None:
        self.budget = budget_bytes
        self.dir = source_dir
        self._runs: OrderedDict[str, CapturedRun] = OrderedDict()
        self._on_disk: dict[str, dict] = {}  # kept runs evicted from memory: name -> manifest
        self._leases: dict[str, int] = {}
        self._lock = threading.RLock()
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._scan()

    # -- persistence ---------------------------------------------------------------

    def _paths(self, name: str) -> tuple[Path, Path]:
        assert self.dir is not None
        check_run_name(name)
        return self.dir / f"{name}.safetensors", self.dir / f"{name}.json"

    def _scan(self) -> None:
        assert self.dir is not None
        for manifest_path in sorted(self.dir.glob("*.json")):
            name = manifest_path.stem
            try:
                check_run_name(name)
                manifest = json.loads(manifest_path.read_text())
            except (InvalidArgument, json.JSONDecodeError, OSError):
                continue
            if (self.dir / f"{name}.safetensors").exists():
                self._on_disk[name] = manifest

    def _persist(self, run: CapturedRun) -> None:
        if self.dir is None or not run.kept:
            return
        tensors_path, manifest_path = self._paths(run.name)
        tensors = {
            f"{hook}/{layer}": t.contiguous().cpu() for (hook, layer), t in run.activations.items()
        }
        if run.last_logits is not None:
            tensors[LOGITS_KEY] = run.last_logits.contiguous().cpu()
        _atomic_write(tensors_path, lambda tmp: save_file(tensors, tmp))
        manifest = {
            "run": run.name,
            "prompt": run.prompt,
            "token_ids": run.token_ids,
            "positions": run.positions,
            "created": run.created,
        }
        _atomic_write(manifest_path, lambda tmp: Path(tmp).write_text(json.dumps(manifest)))

    def _load(self, name: str, header_only: bool = False) -> CapturedRun:
        """The persisted run; ``header_only`` reads shapes and dtypes alone (meta tensors),
        enough for its manifest without loading the activations."""
        tensors_path, _ = self._paths(name)
        manifest = self._on_disk[name]
        if header_only:
            with safe_open(str(tensors_path), framework="pt") as handle:
                tensors = {}
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    piece = handle.get_slice(key)
                    dtype = SAFETENSORS_DTYPES[piece.get_dtype()]
                    tensors[key] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
        else:
            tensors = load_file(str(tensors_path))
        logits = tensors.pop(LOGITS_KEY, None)
        activations = {}
        for key, value in tensors.items():
            hook, _, layer = key.rpartition("/")
            activations[hook, int(layer)] = value
        return CapturedRun(
            name=name,
            prompt=manifest["prompt"],
            token_ids=list(manifest["token_ids"]),
            positions=list(manifest["positions"]),
            activations=activations,
            last_logits=logits,
            created=float(manifest.get("created", 0.0)),
            kept=True,
        )

    # -- the store -----------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._runs or name in self._on_disk

    def names(self) -> list[str]:
        with self._lock:
            return sorted(set(self._runs) | set(self._on_disk))

    def nbytes(self) -> int:
        with self._lock:
            return sum(r.nbytes() for r in self._runs.values())

    def get(self, name: str) -> CapturedRun | None:
        with self._lock:
            run = self._runs.get(name)
            if run is not None:
                self._runs.move_to_end(name)
                return run
            if name in self._on_disk:
                run = self._load(name)
                del self._on_disk[name]
                self._runs[name] = run
                self._evict()
                return run
            return None

    def put(self, run: CapturedRun, overwrite: bool = False) -> None:
        check_run_name(run.name)
        with self._lock:
            if run.name in self and not overwrite:
                raise Conflict(
                    f"run {run.name!r} already exists; pass overwrite: true to replace it", "run"
                )
            self._on_disk.pop(run.name, None)
            self._runs[run.name] = run
            self._runs.move_to_end(run.name)
            self._persist(run)
            self._evict(keep=run.name)

    def keep(self, name: str) -> None:
        with self._lock:
            run = self._runs.get(name)
            if run is not None and not run.kept:
                run.kept = True
                self._persist(run)

    def drop(self, name: str) -> bool:
        with self._lock:
            found = self._runs.pop(name, None) is not None
            found = self._on_disk.pop(name, None) is not None or found
            if self.dir is not None and found:
                for path in self._paths(name):
                    path.unlink(missing_ok=True)
            return found

    def manifest(self, name: str) -> RunManifest | None:
        with self._lock:
            run = self._runs.get(name)
            if run is not None:
                return run.manifest(leases=self._leases.get(name, 0))
            if name in self._on_disk:  # listing must not pull every persisted run into memory
                return self._load(name, header_only=True).manifest(leases=0)
            return None

    @contextmanager
    def lease(self, run: CapturedRun) -> Iterator[CapturedRun]:
        """Hold ``run`` for a request: it is never evicted meanwhile."""
        with self._lock:
            self._leases[run.name] = self._leases.get(run.name, 0) + 1
        try:
            yield run
        finally:
            with self._lock:
                left = self._leases.get(run.name, 1) - 1
                if left:
                    self._leases[run.name] = left
                else:
                    self._leases.pop(run.name, None)

    def _evict(self, keep: str | None = None) -> None:
        total = sum(r.nbytes() for r in self._runs.values())
        for name in list(self._runs):
            if total <= self.budget:
                break
            if name == keep or self._leases.get(name):
                continue
            run = self._runs.pop(name)
            total -= run.nbytes()
            if run.kept and self.dir is not None:
                self._on_disk[name] = {
                    "prompt": run.prompt,
                    "token_ids": run.token_ids,
                    "positions": run.positions,
                    "created": run.created,
                }

    def fresh_name(self, prefix: str = "auto") -> str:
        import uuid

        with self._lock:
            while True:
                name = f"{prefix}-{uuid.uuid4().hex[:12]}"
                if name not in self:
                    return name
