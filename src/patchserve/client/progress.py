"""Progress of a sweep: a ``tqdm.auto`` bar (a widget in Jupyter, text in a terminal) fed by
the stream's cell events, shown by default in a notebook as TransformerLens does."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

OnCell = Callable[[dict[str, Any]], Any]


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (where a progress bar is shown by default)."""
    shell = sys.modules.get("IPython")
    get = getattr(shell, "get_ipython", None)
    kernel = get() if get is not None else None
    return kernel is not None and type(kernel).__name__ == "ZMQInteractiveShell"


class ProgressBar:
    """A ``tqdm.auto`` bar fed by a sweep's cell events."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, event: dict[str, Any]) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=event["total"], desc="sweep", unit="cell")
        self.bar.update(event["done"] - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def with_progress(on_cell: OnCell | None, bar: ProgressBar | None) -> OnCell | None:
    """``on_cell`` that also advances ``bar`` (either may be None)."""
    if bar is None:
        return on_cell
    if on_cell is None:
        return bar

    async def both(event: dict[str, Any]) -> None:
        bar(event)
        result = on_cell(event)
        if inspect.isawaitable(result):
            await result

    return both
