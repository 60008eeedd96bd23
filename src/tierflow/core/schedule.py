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


def ring_eviction_order(candidates: Iterable[int], next_use: Callable[[int], int], last_use: Callable[[int], int],
                        after: int | None) -> list[int]:
    """Generation's eviction order: runs the same units in the same order again and again, and
    `next_use` is a unit's distance ahead in that cycle (the units just used are the farthest).

    A prefetch of the unit at distance `after` evicts only units needed after it, least
    recently used first: no unit still to be used before it loses its room, so each unit is
    read at most once per forward, and the units that stay cached from one forward to the next
    stay the same ones (the bytes read per step do not vary). `after=None`: the unit is needed
    now; the farthest ahead go first (Belady's rule), never a unit fetched ahead of this one
    while another is left.
    """
    if after is None:
        return sorted(candidates, key=lambda uid: (-next_use(uid), uid))
    return sorted((uid for uid in candidates if next_use(uid) > after), key=last_use)
