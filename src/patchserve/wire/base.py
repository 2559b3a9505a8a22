"""The base of every response model: unknown fields are ignored (a newer server may add some)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class WireModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


def omitted_if_none(**kwargs: Any) -> Any:
    """A field that is left out of the JSON body when it is None (``head`` of a cell)."""
    return Field(default=None, exclude_if=lambda value: value is None, **kwargs)
