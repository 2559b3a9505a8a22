"""The growing key/value cache of a decode loop: preallocated, appended in place."""

from __future__ import annotations

import torch

from patchserve.models.state import KVCache


class KVBuffer:
    """Keys and values preallocated for the whole generation; steps write in place."""

    def __init__(self, kv: KVCache, total: int) -> None:
        self.length = kv.length
        self.keys = [self._alloc(k, total) for k in kv.keys]
        self.values = [self._alloc(v, total) for v in kv.values]

    def _alloc(self, t: torch.Tensor | None, total: int) -> torch.Tensor | None:
        if t is None:
            return None
        buf = t.new_empty(t.shape[0], t.shape[1], max(total, t.shape[2]), t.shape[3])
        buf[:, :, : t.shape[2]] = t
        return buf

    def view(self) -> KVCache:
        n = self.length
        return KVCache(
            [None if k is None else k[:, :, :n] for k in self.keys],
            [None if v is None else v[:, :, :n] for v in self.values],
        )

    def append(self, kv: KVCache) -> None:
        n, m = self.length, kv.length
        for bufs, news in ((self.keys, kv.keys), (self.values, kv.values)):
            for buf, new in zip(bufs, news, strict=True):
                if buf is not None and new is not None:
                    buf[:, :, n : n + m] = new
        self.length = n + m
