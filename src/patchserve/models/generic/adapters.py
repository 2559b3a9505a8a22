"""The pieces the generic runtime installs on a ``transformers`` model: module stand-ins
(a skipped decoder layer, the base model replaced by given hidden states) and the forward
hooks and pre-hooks of each hook site, which hand the site's tensor to ``site(layer, hook,
tensor)`` and pass on what it returns."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from patchserve.cancel import raise_if_cancelled
from patchserve.models.config import ModelConfig

Site = Callable[[int, str, torch.Tensor], torch.Tensor]


class SkippedLayer(nn.Module):
    """A decoder layer a resumed pass does not need: passes its input through."""

    def __init__(self, layer: nn.Module, as_tuple: bool) -> None:
        super().__init__()
        object.__setattr__(self, "wrapped", layer)  # attributes (attention_type...) read through
        self.as_tuple = as_tuple

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "wrapped"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) if self.as_tuple else h


class Given:
    """The base model's output as its causal LM reads it: the given hidden states (first
    item, ``last_hidden_state``), nothing else (every other field None)."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.last_hidden_state = hidden

    def __getitem__(self, index: int) -> torch.Tensor:
        if index != 0:
            raise IndexError(index)
        return self.last_hidden_state

    def __getattr__(self, name: str) -> None:
        return None


class GivenHidden(nn.Module):
    """Stands in for the base model while the causal LM's head runs on given hidden states."""

    def forward(self, *args: Any, inputs_embeds: torch.Tensor | None = None, **kwargs: Any) -> Any:
        assert inputs_embeds is not None
        return Given(inputs_embeds)


def _first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | int:
    if args:
        return 0
    for name in ("hidden_states", "x", "input", "inputs"):
        if name in kwargs:
            return name
    raise ValueError("the hooked module was called without a tensor input")


def map_input(
    args: tuple[Any, ...], kwargs: dict[str, Any], fn: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    where = _first_input(args, kwargs)
    if isinstance(where, int):
        return (fn(args[0]), *args[1:]), kwargs
    return args, {**kwargs, where: fn(kwargs[where])}


def map_output(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(output, torch.Tensor):
        return fn(output)
    return (fn(output[0]), *output[1:])


def output_tensor(output: Any) -> torch.Tensor:
    """A module's main output (a tensor, or the first of a tuple)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def input_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    where = _first_input(args, kwargs)
    return args[0] if isinstance(where, int) else kwargs[where]


def pre_attn_hook(layer: int, given: torch.Tensor | None, site: Site) -> Callable[..., Any]:
    def hook(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        raise_if_cancelled()  # a long batch stops within one block of a cancel

        def write(h: torch.Tensor) -> torch.Tensor:
            return site(layer, "pre_attn", h if given is None else given.to(h.dtype))

        return map_input(args, kwargs, write)

    return hook


def post_block_hook(
    layer: int, site: Site, out: dict[str, torch.Tensor] | None
) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        def write(h: torch.Tensor) -> torch.Tensor:
            h = site(layer, "post_block", h)
            if out is not None:
                out["hidden"] = h
            return h

        return map_output(output, write)

    return hook


def attn_out_hook(layer: int, site: Site, reused: torch.Tensor | None) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        def write(h: torch.Tensor) -> torch.Tensor:
            return site(layer, "attn_out", h if reused is None else reused.to(h.dtype))

        return map_output(output, write)

    return hook


def attn_head_hook(
    layer: int, site: Site, reused: torch.Tensor | None, cfg: ModelConfig
) -> Callable[..., Any]:
    def hook(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        def write(z: torch.Tensor) -> torch.Tensor:
            heads = z.reshape(*z.shape[:-1], cfg.num_heads, cfg.head_dim)
            if reused is not None:
                heads = reused.to(z.dtype)
            return site(layer, "attn_head", heads).reshape(z.shape)

        return map_input(args, kwargs, write)

    return hook


def mlp_in_hook(layer: int, site: Site) -> Callable[..., Any]:
    def hook(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return map_input(args, kwargs, lambda h: site(layer, "mlp_in", h))

    return hook


def mlp_out_hook(layer: int, site: Site) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return map_output(output, lambda h: site(layer, "mlp_out", h))

    return hook
