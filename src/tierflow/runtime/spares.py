"""CPU only: device buffers of evicted units, kept for the next fetches of the same size.

On a CPU device, fresh memory costs a page fault per 4 KiB (measured ~3x the copy itself) and
freed memory TLB shootdowns, while the units of a model repeat their sizes layer after layer:
so an evicted unit's buffer is kept and the next fetch of that size takes it. A spare stays
in the device budget until a fetch takes it or room is needed.
"""
from __future__ import annotations

import torch


class SpareBuffers:
    """At most two spares per size, and no more bytes in all than `limit_bytes`."""

    def __init__(self, budget, limit_bytes: int, enabled: bool):
        self.budget = budget
        self.limit_bytes = limit_bytes
        self.enabled = enabled           # False on a GPU: its allocator caches blocks itself
        self.by_size: dict[int, list[torch.Tensor]] = {}

    def keep(self, flat: torch.Tensor) -> bool:
        """Keep an evicted buffer when nothing else holds a view of it (the storage is referenced
        by `flat` and the temporary wrapper only); True if kept (its bytes stay reserved)."""
        use_count = getattr(torch._C, "_storage_Use_Count", None)
        if not self.enabled or use_count is None or use_count(flat.untyped_storage()._cdata) > 2:
            return False
        spares = self.by_size.setdefault(flat.numel(), [])
        held = sum(t.numel() * t.element_size() for group in list(self.by_size.values()) for t in list(group))
        if len(spares) < 2 and held + flat.numel() * flat.element_size() <= self.limit_bytes:
            spares.append(flat)
            return True
        return False

    def pop(self, numel: int) -> torch.Tensor | None:
        """A spare of `numel` elements, its bytes still reserved (for a caller that keeps them);
        None if there is none (any thread: list.pop is atomic)."""
        try:
            return self.by_size.get(numel, []).pop()
        except IndexError:
            return None

    def take(self, numel: int) -> torch.Tensor | None:
        """A spare of `numel` elements whose bytes leave the budget (the fetch taking it has
        reserved its own); None if there is none."""
        flat = self.pop(numel)
        if flat is not None:
            self.budget.release(flat.numel() * flat.element_size())
        return flat

    def drop_until(self, nbytes: int) -> bool:
        """Free spares until `nbytes` fit in the budget; True if any went."""
        dropped = False
        for numel in list(self.by_size):
            while self.budget.room() < nbytes and self.take(numel) is not None:
                dropped = True
        return dropped
