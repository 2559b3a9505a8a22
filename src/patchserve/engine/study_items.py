"""Many facts traced alike (``/v1/patch_study``): one sweep each, then ROME's aggregate.

Every item becomes a ``PatchSweepRequest`` over all positions of its clean
prompt and is validated as a :class:`~patchserve.engine.service.Study` before
any model work (an error names the item: ``items.3.corruption.span``). The
items then run one after another; the aggregate averages their grids on
ROME's token roles (``patchserve.text.roles``), the subject being the noised
span (``noise``) or the corrupt prompt's differing positions (``replace``).
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from patchserve.cancel import cancel_scope
from patchserve.engine.errors import InvalidArgument, StudyError
from patchserve.engine.service import Study, StudyResources
from patchserve.text.alignment import align, differing_positions
from patchserve.text.roles import ROLES, token_roles
from patchserve.wire.base import WireModel
from patchserve.wire.requests import PatchSweepRequest
from patchserve.wire.study import (
    PatchStudyBody,
    PatchStudyRequest,
    RoleGrid,
    StudyAggregate,
    StudyItem,
    StudyItemEvent,
    StudyStartEvent,
    StudySummaryEvent,
)
from patchserve.wire.sweep import SweepBody


def item_request(req: PatchStudyRequest, item: StudyItem) -> PatchSweepRequest:
    """The sweep of one item: the study's settings, the item's prompt, corruption and tokens."""
    shared = req.model_dump(include={"hook", "hooks", "layers", "window", "metric", "logprobs"})
    own = item.model_dump(exclude={"corruption"})
    return PatchSweepRequest(**shared, **own, corruption=item.corruption)


def _subject(study: Study) -> list[int]:
    if study.noise is not None:
        return study.noise.positions
    assert study.clean_ids is not None
    corrupt = study.spec.corrupt_ids
    return differing_positions(align(study.clean_ids, corrupt), study.clean_ids, corrupt)


def _validated(res: StudyResources, req: PatchStudyRequest, index: int) -> tuple[Study, list[int]]:
    try:
        study = Study(res, item_request(req, req.items[index]))
        subject = _subject(study)
        if not subject:
            raise InvalidArgument("the clean and corrupt prompts are the same", "corruption")
    except StudyError as exc:
        param = f"items.{index}.{exc.param}" if exc.param else f"items.{index}"
        raise type(exc)(f"items[{index}]: {exc.message}", param, exc.kind) from exc
    return study, subject


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def _role_grid(hook: str, bodies: list[SweepBody], subjects: list[list[int]]) -> RoleGrid:
    layers = bodies[0].layers
    cells: list[list[list[float]]] = [[[] for _ in ROLES] for _ in layers]
    effects: list[list[list[float]]] = [[[] for _ in ROLES] for _ in layers]
    counts = [0] * len(ROLES)
    for body, subject in zip(bodies, subjects, strict=True):
        grid = next((g.grid for g in body.hook_grids or [] if g.hook == hook), body.grid)
        roles = token_roles(subject, len(body.positions))
        for r, role in enumerate(ROLES):
            counts[r] += len(roles[role])
            for position in roles[role]:
                for i in range(len(layers)):
                    value = grid[i][position]
                    if isinstance(value, float | int):
                        cells[i][r].append(float(value))
                        effects[i][r].append(float(value) - body.corrupt)
    return RoleGrid(
        hook=hook,
        grid=[[_mean(c) for c in row] for row in cells],
        effect=[[_mean(c) for c in row] for row in effects],
        counts=counts,
    )


def aggregate(bodies: list[SweepBody], subjects: list[list[int]]) -> StudyAggregate:
    """The items' grids averaged on ROME's token roles (token-weighted, as ROME's ``Avg``)."""
    first = bodies[0]
    cleans = [b.clean for b in bodies if b.clean is not None]
    return StudyAggregate(
        roles=list(ROLES),
        layers=first.layers,
        metric=first.metric,
        window=first.window,
        hook_grids=[_role_grid(hook, bodies, subjects) for hook in first.hooks],
        corrupt=math.fsum(b.corrupt for b in bodies) / len(bodies),
        clean=_mean(cleans) if len(cleans) == len(bodies) else None,
    )


class FactStudy:
    """A validated ``/v1/patch_study``: its items' studies and subjects."""

    def __init__(self, res: StudyResources, req: PatchStudyRequest) -> None:
        self.res, self.req = res, req
        validated = [_validated(res, req, i) for i in range(len(req.items))]
        self.studies = [study for study, _ in validated]
        self.subjects = [subject for _, subject in validated]

    def body(self, bodies: list[SweepBody]) -> PatchStudyBody:
        return PatchStudyBody(
            model=self.res.model_name,
            items=bodies,
            subjects=self.subjects,
            aggregate=aggregate(bodies, self.subjects),
        )

    def run(self) -> PatchStudyBody:
        """Every item in this thread, then the aggregate."""
        return self.body([study.run() for study in self.studies])

    async def events(
        self, run_blocking: Callable[[Callable[[], Any]], Awaitable[Any]]
    ) -> AsyncIterator[WireModel]:
        """start, one ``item`` per fact as it finishes, summary. Closing the iterator (a
        client that left) stops the running item within one transformer block."""
        left = threading.Event()

        def scoped(study: Study) -> SweepBody:
            with cancel_scope(left.is_set):
                return study.run()

        bodies: list[SweepBody] = []
        try:
            yield StudyStartEvent(items=len(self.studies), roles=list(ROLES))
            for index, study in enumerate(self.studies):
                bodies.append(await run_blocking(functools.partial(scoped, study)))
                yield StudyItemEvent(index=index, subject=self.subjects[index], body=bodies[-1])
            yield StudySummaryEvent(**dict(self.body(bodies)))
        finally:
            left.set()
