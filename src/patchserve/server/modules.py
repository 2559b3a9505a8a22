"""Named vectors for `source_module` and `steer`: {hook: {layer: vector}}; `zeros` is built in."""

from __future__ import annotations

import threading

import torch

from patchserve.errors import Conflict, InvalidArgument, NotFound
from patchserve.wire.info import ModuleInfo, ModuleVectorInfo

BUILTIN = "zeros"


class ModuleRegistry:
    def __init__(self) -> None:
        self._modules: dict[str, dict[tuple[str, int], torch.Tensor]] = {}
        self._lock = threading.Lock()

    def register(
        self, name: str, vectors: dict[tuple[str, int], torch.Tensor], overwrite: bool = False
    ) -> None:
        if name == BUILTIN:
            raise InvalidArgument(f"{BUILTIN!r} is built in and cannot be replaced", "name")
        with self._lock:
            if name in self._modules and not overwrite:
                raise Conflict(f"module {name!r} already exists; pass overwrite: true", "name")
            self._modules[name] = vectors

    def drop(self, name: str) -> bool:
        if name == BUILTIN:
            raise InvalidArgument(f"{BUILTIN!r} is built in and cannot be deleted", "name")
        with self._lock:
            return self._modules.pop(name, None) is not None

    def exists(self, name: str) -> bool:
        return name == BUILTIN or name in self._modules

    def vector(
        self, name: str, hook: str, layer: int, width: int, like: torch.Tensor
    ) -> torch.Tensor:
        if name == BUILTIN:
            return torch.zeros(width, dtype=like.dtype, device=like.device)
        with self._lock:
            module = self._modules.get(name)
        if module is None:
            raise NotFound(f"unknown module {name!r}", "source_module")
        vec = module.get((hook, layer))
        if vec is None:
            raise InvalidArgument(
                f"module {name!r} has no vector for hook {hook} at layer {layer}", "source_module"
            )
        return vec.to(dtype=like.dtype, device=like.device)

    def listing(self) -> list[ModuleInfo]:
        with self._lock:
            items = [
                ModuleInfo(
                    name=name,
                    vectors=sorted(
                        (
                            ModuleVectorInfo(hook=h, layer=layer, width=int(v.numel()))
                            for (h, layer), v in vecs.items()
                        ),
                        key=lambda info: (info.hook, info.layer),
                    ),
                )
                for name, vecs in sorted(self._modules.items())
            ]
        return [ModuleInfo(name=BUILTIN, builtin=True, vectors=[]), *items]
