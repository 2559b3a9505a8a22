"""Pairing corrupt (destination) positions with clean (source) positions.

Equal token lengths pair ``i`` with ``i``. Unequal lengths pair the common
token prefix by identity and the common token suffix by the length
difference; the differing middle of the corrupt prompt has no partner (those
destination positions are skipped and listed, never silently shifted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Alignment:
    clean_length: int
    corrupt_length: int
    prefix: int  # common prefix tokens (unequal lengths) / corrupt_length (equal)
    suffix: int  # common suffix tokens (unequal lengths only)

    @property
    def equal_length(self) -> bool:
        return self.clean_length == self.corrupt_length

    @property
    def shift(self) -> int:
        return self.clean_length - self.corrupt_length

    def source_position(self, dest: int) -> int | None:
        """The clean position paired with corrupt position ``dest``, or None."""
        if not 0 <= dest < self.corrupt_length:
            raise IndexError(dest)
        if self.equal_length or dest < self.prefix:
            return dest
        if dest >= self.corrupt_length - self.suffix:
            return dest + self.shift
        return None

    def unpaired(self) -> list[int]:
        if self.equal_length:
            return []
        return list(range(self.prefix, self.corrupt_length - self.suffix))


def differing_positions(
    alignment: Alignment, clean_ids: Sequence[int], corrupt_ids: Sequence[int]
) -> list[int]:
    """Corrupt positions whose token differs from its clean partner, or that have none:
    where the corruption is (a figure marks them)."""
    out = []
    for dest, token in enumerate(corrupt_ids):
        src = alignment.source_position(dest)
        if src is None or clean_ids[src] != token:
            out.append(dest)
    return out


def align(clean_ids: Sequence[int], corrupt_ids: Sequence[int]) -> Alignment:
    nc, nd = len(clean_ids), len(corrupt_ids)
    if nc == nd:
        return Alignment(nc, nd, prefix=nd, suffix=0)
    limit = min(nc, nd)
    prefix = 0
    while prefix < limit and clean_ids[prefix] == corrupt_ids[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and clean_ids[nc - 1 - suffix] == corrupt_ids[nd - 1 - suffix]:
        suffix += 1
    return Alignment(nc, nd, prefix=prefix, suffix=suffix)
