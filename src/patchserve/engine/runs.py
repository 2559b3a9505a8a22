"""Captured runs: the stored activations of one forward pass (the clean source of a sweep)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import torch

from patchserve.engine.errors import InvalidArgument
from patchserve.models import HOOKS, HookContext, Transformer
from patchserve.wire.runs import RunManifest

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str, param: str = "run", what: str = "run") -> str:
    """The one rule for the names a request gives (runs, vector modules): safe as a file name."""
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        raise InvalidArgument(
            f"invalid {what} name {name!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit",
            param,
        )
    return name


def check_run_name(name: str, param: str = "run") -> str:
    return check_name(name, param, "run")


@dataclass
class CapturedRun:
    """Activations ``(hook, layer) → [positions, width]`` (``attn_head``: ``[positions, heads,
    head_dim]``) of one prompt, with its last-position logits for grading."""

    name: str
    prompt: str
    token_ids: list[int]
    positions: list[int]
    activations: dict[tuple[str, int], torch.Tensor]
    last_logits: torch.Tensor | None
    created: float = field(default_factory=time.time)
    kept: bool = False
    leases: int = 0

    @property
    def dtype(self) -> str:
        for t in self.activations.values():
            return str(t.dtype).removeprefix("torch.")
        return "float32"

    def nbytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in self.activations.values())
        if self.last_logits is not None:
            total += self.last_logits.numel() * self.last_logits.element_size()
        return total

    def hook_layers(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for hook, layer in sorted(self.activations, key=lambda k: (HOOKS.index(k[0]), k[1])):
            out.setdefault(hook, []).append(layer)
        return out

    def row(self, hook: str, layer: int, position: int) -> torch.Tensor | None:
        """The activation at one site, or None when it was not captured."""
        acts = self.activations.get((hook, layer))
        if acts is None or position not in self.positions:
            return None
        return acts[self.positions.index(position)]

    def manifest(self, leases: int | None = None) -> RunManifest:
        return RunManifest(
            run=self.name,
            prompt=self.prompt,
            token_ids=self.token_ids,
            num_tokens=len(self.token_ids),
            hooks=self.hook_layers(),
            positions=self.positions,
            dtype=self.dtype,
            bytes=self.nbytes(),
            created=int(self.created),
            kept=self.kept,
            leases=self.leases if leases is None else leases,
        )


def capture_run(
    model: Transformer,
    name: str,
    prompt: str,
    token_ids: list[int],
    hooks: dict[str, list[int]],
    positions: list[int] | None = None,
) -> CapturedRun:
    """One forward of ``token_ids`` keeping the requested sites (all positions by default)."""
    positions = list(range(len(token_ids))) if positions is None else positions
    sites = [(layer, hook) for hook, layers in hooks.items() for layer in layers]
    ids = torch.tensor([token_ids], device=model.device)
    with torch.inference_mode():
        out = model.prefill(ids, HookContext.build(capture=sites))
    index = torch.tensor(positions)  # on each capture's device (a device map: its layer's)
    activations = {
        (hook, layer): _select(out.captured[layer, hook][0], index) for layer, hook in sites
    }
    return CapturedRun(
        name=name,
        prompt=prompt,
        token_ids=list(token_ids),
        positions=list(positions),
        activations=activations,
        last_logits=out.logits[0].float().clone(),
    )


def _select(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return t.index_select(0, index.to(t.device)).clone()
