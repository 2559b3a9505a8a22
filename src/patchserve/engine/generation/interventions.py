"""Patches and steering vectors of a generation, split into the passes that compute their
positions (the prompt pass, then one decoding pass per token)."""

from __future__ import annotations

import dataclasses

import torch

from patchserve.engine.generation.types import GenerationRequest
from patchserve.models.hooks import HookContext, SiteEdit, make_edit


def _select(edit: SiteEdit, index: list[int]) -> SiteEdit:
    idx = torch.tensor(index, dtype=torch.long, device=edit.rows.device)
    return dataclasses.replace(
        edit,
        rows=edit.rows[idx],
        positions=edit.positions[idx],
        source=edit.source[idx],
        alpha=edit.alpha[idx],
        mask=None if edit.mask is None else edit.mask[idx],
        heads=None if edit.heads is None else edit.heads[idx],
    )


class Interventions:
    """The edits and steering of every pass, split by the positions each pass computes."""

    def __init__(self, request: GenerationRequest, prompt_len: int, device: torch.device) -> None:
        self.prompt_len = prompt_len
        self.device = device
        self.prompt_edits: list[SiteEdit] = []
        self.step_edits: dict[int, list[SiteEdit]] = {}
        for edit in request.edits:
            edit = edit.to(device)
            positions = edit.positions.tolist()
            inside = [i for i, p in enumerate(positions) if p < prompt_len]
            if inside:
                whole = len(inside) == len(positions)
                self.prompt_edits.append(edit if whole else _select(edit, inside))
            later: dict[int, list[int]] = {}
            for i, p in enumerate(positions):
                if p >= prompt_len:
                    later.setdefault(p, []).append(i)
            for p, index in later.items():
                self.step_edits.setdefault(p, []).append(_select(edit, index))
        self.steer = [
            (s, s.vector.to(device=device, dtype=torch.float32))
            for s in request.steer
            if s.scale != 0  # an exact no-op
        ]

    def context(self, start: int, count: int) -> HookContext:
        """The hooks of the pass computing positions ``start .. start + count - 1``."""
        return HookContext.build(self.edits(start, count, 0))

    def edits(self, start: int, count: int, row: int) -> list[SiteEdit]:
        """The edits of the pass computing positions ``start .. start + count - 1`` of this
        sequence, sitting at row ``row`` of the pass (a batched generation's rows)."""
        edits = list(self.prompt_edits if start == 0 else self.step_edits.get(start, ()))
        if row != 0:
            edits = [dataclasses.replace(e, rows=torch.full_like(e.rows, row)) for e in edits]
        positions = torch.arange(start, start + count, device=self.device)
        rows = torch.full((count,), row, dtype=torch.long, device=self.device)
        for steer, vector in self.steer:
            heads = None if steer.head is None else [steer.head] * count
            edits.append(
                make_edit(
                    steer.layer,
                    steer.hook,
                    rows,
                    positions,
                    vector,
                    alpha=float(steer.scale),
                    heads=heads,
                    kind="add",
                )
            )
        return edits
