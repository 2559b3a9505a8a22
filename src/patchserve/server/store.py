"""The source store: captured runs under a byte budget, leased while in use.

Whole-run LRU: when the resident runs exceed the budget, the least recently
used run that no in-flight request holds is evicted (a kept run that was
persisted stays on disk and is reloaded on its next use). ``drop`` always
wins, leased or not — the request holding it keeps its own reference and
finishes with the data it has.

With a ``source_dir``, each kept run is one file (``server/runfiles.py``:
written to a temporary name, fsynced, renamed once). ``put`` persists before
it changes anything in memory: when the save fails (disk full, quota, I/O
error) it raises ``InsufficientStorage`` and the store — memory and folder —
holds exactly what it held before. The slow write happens outside the lock;
the rename and the in-memory update happen together under it, so the folder
and the memory agree on which of two racing overwrites won. At start the
folder is cleaned and checked (``scan_folder``). Names are validated
(``check_run_name``), so nothing a request says reaches outside the folder.
Every method may block on disk: the server calls them from worker threads.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from patchserve.engine.runs import CapturedRun, check_run_name
from patchserve.errors import Conflict, InsufficientStorage
from patchserve.server.runfiles import (
    RunFileError,
    commit,
    load_run,
    quarantine,
    run_path,
    scan_folder,
    write_temp,
)
from patchserve.wire.runs import RunManifest

log = logging.getLogger("patchserve.store")


def _reason(exc: Exception) -> str:
    """What went wrong, without the server's paths (those go to the log only)."""
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


class RunStore:
    def __init__(self, budget_bytes: int, source_dir: Path | None = None) -> None:
        self.budget = budget_bytes
        self.dir = source_dir
        self._runs: OrderedDict[str, CapturedRun] = OrderedDict()  # resident, LRU order
        self._files: dict[str, dict[str, Any]] = {}  # persisted runs: name -> manifest
        self._leases: dict[str, int] = {}
        self._lock = threading.RLock()  # guards the dicts; held for no file work but a rename
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._files = scan_folder(self.dir)

    # -- persistence ---------------------------------------------------------------

    def _path(self, name: str) -> Path:
        assert self.dir is not None
        return run_path(self.dir, check_run_name(name))

    def _write(self, run: CapturedRun) -> tuple[Path, dict[str, Any]]:
        assert self.dir is not None
        try:
            return write_temp(self.dir, run)
        except (OSError, SafetensorError) as exc:
            log.error("could not save run %r: %s", run.name, exc)
            raise InsufficientStorage(
                f"could not save run {run.name!r} to the server's run folder "
                f"({_reason(exc)}); nothing was changed",
                "run",
            ) from exc

    def _commit(self, name: str, tmp: Path) -> None:
        try:
            commit(tmp, self._path(name))
        except OSError as exc:
            log.error("could not rename the saved run %r into place: %s", name, exc)
            raise InsufficientStorage(
                f"could not save run {name!r} ({_reason(exc)}); nothing was changed", "run"
            ) from exc

    def _forget_bad_file(self, name: str, manifest: dict[str, Any], reason: str) -> None:
        with self._lock:
            if self._files.get(name) is not manifest:
                return  # replaced or dropped meanwhile: not the file that failed
            del self._files[name]
            quarantine(self._path(name), reason)

    # -- the store -----------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._runs or name in self._files

    def names(self) -> list[str]:
        with self._lock:
            return sorted(set(self._runs) | set(self._files))

    def nbytes(self) -> int:
        with self._lock:
            return sum(r.nbytes() for r in self._runs.values())

    def get(self, name: str) -> CapturedRun | None:
        """The run, read from its file (outside the lock) when it is not resident."""
        with self._lock:
            run = self._runs.get(name)
            if run is not None:
                self._runs.move_to_end(name)
                return run
            manifest = self._files.get(name)
        if manifest is None:
            return None
        try:
            loaded = load_run(self._path(name), manifest)
        except RunFileError as exc:
            self._forget_bad_file(name, manifest, str(exc))
            return None
        with self._lock:
            resident = self._runs.get(name)
            if resident is not None:  # loaded or replaced by another request meanwhile
                return resident
            if self._files.get(name) is not manifest:  # dropped or replaced meanwhile
                return self.get(name)
            self._runs[name] = loaded
            self._evict(keep=name)
            return loaded

    def _check_free(self, name: str, overwrite: bool) -> None:
        if name in self and not overwrite:
            message = f"run {name!r} already exists; pass overwrite: true to replace it"
            raise Conflict(message, "run")

    def put(self, run: CapturedRun, overwrite: bool = False) -> None:
        """Store ``run`` (persisted first when kept and there is a folder)."""
        check_run_name(run.name)
        self._check_free(run.name, overwrite)
        written = self._write(run) if self.dir is not None and run.kept else None
        try:
            with self._lock:
                self._check_free(run.name, overwrite)
                if written is not None:
                    tmp, manifest = written
                    self._commit(run.name, tmp)
                    written = None
                    self._files[run.name] = manifest
                elif self._files.pop(run.name, None) is not None:  # an unkept run replaces it
                    self._path(run.name).unlink(missing_ok=True)
                self._runs[run.name] = run
                self._runs.move_to_end(run.name)
                self._evict(keep=run.name)
        finally:
            if written is not None:
                written[0].unlink(missing_ok=True)

    def drop(self, name: str) -> bool:
        with self._lock:
            found = self._runs.pop(name, None) is not None
            if self._files.pop(name, None) is not None:
                found = True
                self._path(name).unlink(missing_ok=True)
            return found

    def manifest(self, name: str) -> RunManifest | None:
        with self._lock:
            run = self._runs.get(name)
            if run is not None:
                return run.manifest(leases=self._leases.get(name, 0))
            manifest = self._files.get(name)
        if manifest is None:
            return None
        # listing must not pull every persisted run into memory: shapes from the manifest
        return load_run(self._path(name), manifest, header_only=True).manifest(leases=0)

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
        """Resident runs past the budget leave memory (a persisted one stays on disk)."""
        total = sum(r.nbytes() for r in self._runs.values())
        for name in list(self._runs):
            if total <= self.budget:
                break
            if name == keep or self._leases.get(name):
                continue
            total -= self._runs.pop(name).nbytes()

    def fresh_name(self, prefix: str = "auto") -> str:
        with self._lock:
            while True:
                name = f"{prefix}-{uuid.uuid4().hex[:12]}"
                if name not in self:
                    return name
