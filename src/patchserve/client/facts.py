"""Results of a many-fact study (``POST /v1/patch_study``): :class:`StudyResult`, whose
``aggregate`` holds one :class:`RoleResult` per hook — the grids averaged on ROME's
token roles — and whose ``items`` are every fact's own :class:`SweepResult`.

Also how a fact list becomes study items: ``{"clean", "corrupt", "answer", "foil"}``
(the bundled model's ``examples.json``) or ``{"prompt", "subject", "answer"}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from patchserve.client.results import SweepResult
from patchserve.text.roles import differing_words
from patchserve.wire.study import PatchStudyBody

if TYPE_CHECKING:
    from matplotlib.axes import Axes


@dataclass
class RoleResult:
    """One hook's aggregate: ``grid[i][r]`` = mean value at layer ``layers[i]`` over the
    items' tokens of role ``roles[r]`` (``counts[r]`` tokens)."""

    hook: str
    metric: str
    roles: list[str]
    layers: list[int]
    grid: list[list[float | None]]
    counts: list[int]
    window: int
    items: int
    clean: float | None
    corrupt: float | None
    effect: list[list[float | None]] | None = None  # value - its item's corrupt baseline
    is_effect: bool = False  # this grid is the effect (what effects() returns)

    def effects(self) -> RoleResult:
        """The average indirect effect (ROME's Fig. 2): each value minus its item's corrupt
        baseline, averaged; centred on 0 (``clean`` becomes clean - corrupt)."""
        if self.effect is None:
            raise ValueError("this aggregate carries no effect grid")
        clean = None if self.clean is None or self.corrupt is None else self.clean - self.corrupt
        return replace(
            self, grid=self.effect, effect=None, corrupt=0.0, clean=clean, is_effect=True
        )

    def to_numpy(self) -> np.ndarray:
        """``[layers, roles]`` float64, NaN where no item had a token of the role."""
        return np.array([[np.nan if v is None else v for v in row] for row in self.grid])

    def value(self, layer: int, role: str) -> float | None:
        return self.grid[self.layers.index(layer)][self.roles.index(role)]

    def peak_role(self, layer: int) -> str:
        """The role with the largest mean at ``layer``."""
        row = self.to_numpy()[self.layers.index(layer)]
        return self.roles[int(np.nanargmax(row))]

    def heatmap(self, ax: Axes | None = None, **kwargs: Any) -> Axes:
        """ROME's figure: roles as rows, layers as columns (``figures.role_heatmap``)."""
        from patchserve.client.figures import role_heatmap

        return role_heatmap(self, ax, **kwargs)


@dataclass
class StudyResult:
    """Every item's sweep (``{hook: result}`` when several hooks were asked) and the
    aggregate per hook."""

    items: list[SweepResult | dict[str, SweepResult]]
    subjects: list[list[int]]
    aggregate: dict[str, RoleResult]
    body: PatchStudyBody = field(repr=False)

    @classmethod
    def from_body(cls, body: PatchStudyBody, hooks_given: bool) -> StudyResult:
        agg = body.aggregate
        roles = {
            g.hook: RoleResult(
                hook=g.hook,
                metric=agg.metric,
                roles=agg.roles,
                layers=agg.layers,
                grid=g.grid,
                effect=g.effect,
                counts=g.counts,
                window=agg.window,
                items=len(body.items),
                clean=agg.clean,
                corrupt=agg.corrupt,
            )
            for g in agg.hook_grids
        }
        items: list[SweepResult | dict[str, SweepResult]] = [
            SweepResult.per_hook(item) if hooks_given else SweepResult.from_body(item)
            for item in body.items
        ]
        return cls(items=items, subjects=body.subjects, aggregate=roles, body=body)

    def heatmap(self, hook: str | None = None, ax: Axes | None = None, **kwargs: Any) -> Axes:
        """The aggregate of ``hook`` (default: the first) as ROME's role × layer figure."""
        return self.aggregate[hook or next(iter(self.aggregate))].heatmap(ax, **kwargs)


def fact_item(fact: Mapping[str, Any], corruption: str, noise: Mapping[str, Any]) -> dict:
    """A study item of one fact: ``{"clean"/"prompt", "subject" or "corrupt", "answer",
    "foil"}``; ``corruption`` ``"noise"`` noises the subject (default: the words where
    ``clean`` and ``corrupt`` differ), ``"replace"`` patches into ``corrupt``."""
    prompt = fact.get("prompt", fact.get("clean"))
    if not isinstance(prompt, str):
        raise ValueError(f"a fact needs its clean prompt ('clean' or 'prompt'): {dict(fact)}")
    item: dict[str, Any] = {"prompt": prompt}
    if corruption == "replace":
        if "corrupt" not in fact:
            raise ValueError(f"corruption='replace' needs a 'corrupt' prompt: {dict(fact)}")
        item["corruption"] = {"type": "replace", "prompt": fact["corrupt"]}
    elif corruption == "noise":
        subject = fact.get("subject")
        if subject is None and "corrupt" in fact:
            subject = differing_words(prompt, fact["corrupt"])
        if subject is None:
            raise ValueError(
                f"a noised fact needs its 'subject' (or a 'corrupt' prompt): {dict(fact)}"
            )
        item["corruption"] = {"type": "noise", "span": subject, **noise}
    else:
        raise ValueError(f"corruption must be 'noise' or 'replace', got {corruption!r}")
    for key, name in (("answer", "answer_token"), ("foil", "foil_token")):
        value = fact.get(key, fact.get(name))
        if value is not None:
            item[f"{name}_id" if isinstance(value, int) else name] = value
    return item


def fact_items(
    facts: Sequence[Mapping[str, Any]], corruption: str, noise: Mapping[str, Any]
) -> list[dict]:
    return [fact_item(fact, corruption, noise) for fact in facts]
