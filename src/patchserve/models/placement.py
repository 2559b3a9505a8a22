"""Where a model's layers live: one device, or a device map over several.

A :class:`Placement` is a list of stages, each a device holding a contiguous
range of decoder layers; the embedding sits on the first layer's device, the
final norm and ``lm_head`` on the last's. Specs (``--device-map``):

* ``"auto"`` — fill the visible GPUs in order up to their free memory, the
  rest on ``cpu`` (offload as the last resort; no GPU: everything on ``cpu``);
* ``"balanced"`` — an even split over the visible GPUs (``auto`` when a share
  does not fit);
* ``"0:0-13,1:14-27"`` — explicit ranges: a bare index is a CUDA device, any
  other name a torch device (``cpu:0-1,cpu:2-3``, ``cuda:1:4-7``).

The residual crosses a stage boundary through :func:`transfer` (exact: a copy).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


class DeviceMapError(ValueError):
    """A ``--device-map`` that names no device, a missing one, or does not cover every layer."""


# Free GPU memory a planned device map leaves for activations and caches.
GPU_HEADROOM = 0.1


@dataclass(frozen=True)
class Stage:
    device: torch.device
    start: int
    stop: int  # exclusive


@dataclass(frozen=True)
class Placement:
    """Contiguous stages covering layers ``0..L-1`` exactly once, in order."""

    stages: tuple[Stage, ...]

    @classmethod
    def single(cls, device: torch.device | str, num_layers: int) -> Placement:
        return cls((Stage(torch.device(device), 0, num_layers),))

    def stage_of(self, layer: int) -> int:
        for i, stage in enumerate(self.stages):
            if stage.start <= layer < stage.stop:
                return i
        return len(self.stages) - 1  # layer L: the residual leaving the last block

    def device_of(self, layer: int) -> torch.device:
        return self.stages[self.stage_of(layer)].device

    @property
    def input_device(self) -> torch.device:
        return self.stages[0].device

    @property
    def output_device(self) -> torch.device:
        return self.stages[-1].device

    def describe(self) -> str:
        return ",".join(f"{s.device}:{s.start}-{s.stop - 1}" for s in self.stages)


def transfer(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The residual (or any tensor) moved onto the next stage's device."""
    return x.to(device)


def _device(name: str) -> torch.device:
    try:
        device = torch.device("cuda", int(name)) if name.isdigit() else torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise DeviceMapError(f"device map: {name!r} is not a torch device") from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise DeviceMapError(
                f"device map: {device} does not exist ({count} CUDA devices visible)"
            )
    elif device.type not in ("cpu", "meta") and device.index is not None:
        # mps/xpu and friends: a bare existence check is the best the API offers
        module = getattr(torch, device.type, None)
        if module is None or not module.is_available():
            raise DeviceMapError(f"device map: {device} is not available")
    return device


def _range(text: str, num_layers: int) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        start, stop = int(lo), int(hi or lo) + 1
    except ValueError:
        raise DeviceMapError(f"device map: {text!r} is not a layer range like 0-13") from None
    if not 0 <= start < stop <= num_layers:
        raise DeviceMapError(f"device map: layers {text} outside 0-{num_layers - 1}")
    return start, stop


def parse_explicit(spec: str, num_layers: int) -> Placement:
    """``"dev:a-b,dev:c-d"``: ranges must cover every layer exactly once, in order."""
    stages = []
    for entry in spec.split(","):
        name, sep, layers = entry.strip().rpartition(":")
        if not sep or not name:
            raise DeviceMapError(f"device map: entry {entry!r} must be DEVICE:FIRST-LAST")
        stages.append(Stage(_device(name), *_range(layers, num_layers)))
    stages.sort(key=lambda s: s.start)
    expected = 0
    for stage in stages:
        if stage.start != expected:
            what = "overlap" if stage.start < expected else f"miss layer {expected}"
            raise DeviceMapError(f"device map {spec!r}: ranges {what}")
        expected = stage.stop
    if expected != num_layers:
        raise DeviceMapError(
            f"device map {spec!r}: layers {expected}-{num_layers - 1} have no device"
        )
    return Placement(tuple(stages))


def pack(sizes: Sequence[int], capacities: Sequence[tuple[torch.device, int]]) -> Placement:
    """Layers (``sizes`` in bytes, the first and last including embedding and head) packed
    in order onto ``capacities``; whatever does not fit goes to ``cpu``."""
    bins = [*capacities, (torch.device("cpu"), -1)]
    stages, b, used, start = [], 0, 0, 0
    for layer, size in enumerate(sizes):
        while bins[b][1] >= 0 and used + size > bins[b][1]:
            if layer > start:
                stages.append(Stage(bins[b][0], start, layer))
            b, used, start = b + 1, 0, layer
        used += size
    stages.append(Stage(bins[b][0], start, len(sizes)))
    return Placement(tuple(stages))


def balanced(sizes: Sequence[int], capacities: Sequence[tuple[torch.device, int]]) -> Placement:
    """An even split of the layers over ``capacities``; :func:`pack` where a share won't fit."""
    n, k = len(sizes), len(capacities)
    bounds = [round(i * n / k) for i in range(k + 1)]
    stages = [
        Stage(device, a, b)
        for (device, _), a, b in zip(capacities, bounds[:-1], bounds[1:], strict=True)
        if b > a
    ]
    fits = all(
        sum(sizes[a:b]) <= cap
        for (_, cap), a, b in zip(capacities, bounds[:-1], bounds[1:], strict=True)
    )
    if not fits:
        log.warning("device map balanced: an even share does not fit; packing like auto")
        return pack(sizes, capacities)
    return Placement(tuple(stages))


def gpu_capacities() -> list[tuple[torch.device, int]]:
    """Each visible GPU with the bytes of weights it may take (free memory less headroom)."""
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        free, _ = torch.cuda.mem_get_info(i)
        out.append((torch.device("cuda", i), int(free * (1 - GPU_HEADROOM))))
    return out


def plan(
    spec: str,
    sizes: Sequence[int],
    capacities: Callable[[], list[tuple[torch.device, int]]] = gpu_capacities,
) -> Placement:
    """The placement a ``--device-map`` spec asks for, for layers of ``sizes`` bytes."""
    spec = spec.strip()
    if spec not in ("auto", "balanced"):
        return parse_explicit(spec, len(sizes))
    gpus = capacities()
    if not gpus:
        log.warning("device map %s: no GPU visible, every layer on cpu", spec)
        return Placement.single("cpu", len(sizes))
    placement = balanced(sizes, gpus) if spec == "balanced" else pack(sizes, gpus)
    if placement.output_device.type == "cpu":
        log.warning("device map %s: the GPUs do not hold every layer; offloading to cpu", spec)
    log.info("device map %s: %s", spec, placement.describe())
    return placement
