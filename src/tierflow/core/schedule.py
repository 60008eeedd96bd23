"""Prefetch and eviction decisions: pure functions over sizes and states."""
from __future__ import annotations

from typing import Callable, Iterable


def prefetch_window(upcoming: Iterable[int], size: Callable[[int], int], needs_fetch: Callable[[int], bool],
                    window_bytes: int) -> list[int]:
    """Upcoming units to start fetching now: those not yet on the device, nearest first,
    as long as their bytes fit in `window_bytes` (bytes of units already on the way count)."""
    chosen, used = [], 0
    for uid in upcoming:
        used += size(uid)
        if used > window_bytes:
            break
        if needs_fetch(uid):
            chosen.append(uid)
    return chosen


def eviction_order(candidates: Iterable[int], last_use: Callable[[int], int]) -> list[int]:
    """Evictable units, least recently used first.

    With a forward/backward pattern, the units used earliest in forward are used
    last in backward, so least-recently-used is also the unit needed furthest ahead.
    """
    return sorted(candidates, key=last_use)
