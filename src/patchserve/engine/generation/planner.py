"""The planner of continuous batching (pure, torch-free): which waiting prompts join the
running batch before the next decoding step, in which prefill passes, and how the block's
rows close up when rows leave.

* **Admission** is first come, first served: waiting prompts join in arrival order while
  the step's prompt tokens stay within the token ``budget`` and the running rows within
  ``max_rows``; a prompt that does not fit waits (no later prompt overtakes it). One
  prompt longer than the budget joins alone (else it would never run).
* **Grouping**: the admitted prompts are sorted by length and cut into prefill passes of
  similar lengths, so a pass pads little: the cut minimises the padded tokens of the
  passes plus ``pass_tokens`` per pass (what one more pass costs, in tokens: its fixed
  per-pass work), exactly (dynamic programming over the sorted lengths).
* **Compaction** (:func:`compact_moves`): rows that leave leave holes; the rows past the
  new end move into them (each moved once), so a leave copies only as many rows as left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PREFILL_BUDGET = 4096  # prompt tokens prefilled in one step (the server: --max-batch-tokens)
MAX_ROWS = 256  # rows decoding together
PASS_TOKENS = 64  # the fixed cost of one more prefill pass, in padded tokens


@dataclass(frozen=True)
class Waiting:
    """A prompt waiting to join: ``tokens`` long, taking ``rows`` rows (its ``n`` samples)."""

    key: int
    tokens: int
    rows: int = 1


def admit(waiting: Sequence[Waiting], running: int, budget: int, max_rows: int) -> list[Waiting]:
    """The prompts (a prefix of ``waiting``, in arrival order) that join before the next
    step: within ``budget`` prompt tokens and ``max_rows`` rows with the ``running`` ones."""
    chosen: list[Waiting] = []
    tokens, rows = 0, running
    for w in waiting:
        first = not chosen
        fits_tokens = tokens + w.tokens <= budget or first
        fits_rows = rows + w.rows <= max_rows or (first and running == 0)
        if not (fits_tokens and fits_rows):
            break
        chosen.append(w)
        tokens, rows = tokens + w.tokens, rows + w.rows
    return chosen


def group(admitted: Sequence[Waiting], pass_tokens: int = PASS_TOKENS) -> list[list[Waiting]]:
    """The admitted prompts as prefill passes of similar lengths (shortest first), cut where
    the padded tokens plus ``pass_tokens`` per pass are least."""
    ordered = sorted(admitted, key=lambda w: w.tokens)
    n = len(ordered)
    cost = [0] + [0] * n  # cost[i]: the best cut of the i shortest
    cut = [0] * (n + 1)  # where the last pass of that cut starts
    for i in range(1, n + 1):
        longest = ordered[i - 1].tokens
        best, where = None, 0
        for j in range(i):
            c = cost[j] + pass_tokens + (i - j) * longest
            if best is None or c < best:
                best, where = c, j
        cost[i], cut[i] = best or 0, where
    passes: list[list[Waiting]] = []
    i = n
    while i > 0:
        passes.append(ordered[cut[i] : i])
        i = cut[i]
    return passes[::-1]


def plan_prefill(
    waiting: Sequence[Waiting],
    running: int,
    budget: int = PREFILL_BUDGET,
    max_rows: int = MAX_ROWS,
    pass_tokens: int = PASS_TOKENS,
) -> list[list[Waiting]]:
    """The prefill passes before the next decoding step (empty: nothing joins)."""
    return group(admit(waiting, running, budget, max_rows), pass_tokens)


def compact_moves(rows: int, leaving: Sequence[int]) -> list[tuple[int, int]]:
    """``(to, from)`` row moves that close the holes ``leaving`` leaves in ``rows`` rows:
    the staying rows past the new end fill the holes below it, in order."""
    gone = set(leaving)
    end = rows - len(gone)
    holes = [i for i in range(end) if i in gone]
    movers = [i for i in range(end, rows) if i not in gone]
    return list(zip(holes, movers, strict=True))
