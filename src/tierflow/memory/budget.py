"""Byte accounting for one memory tier.

The engine reserves bytes here before it allocates on a tier and releases them
after it frees, so `used` is the engine's own accounted footprint on that tier
and `peak` its high-water mark. Reservations never exceed the capacity: a
caller either waits for a release from another thread (`reserve(wait=...)`) or
gets a clear `BudgetError`.
"""
from __future__ import annotations

import threading

from tierflow.config import format_size
from tierflow.errors import BudgetError


class Budget:
    """Thread-safe counter of bytes held on one tier, bounded by `capacity` (None = unbounded)."""

    def __init__(self, name: str, capacity: int | None):
        self.name = name
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self.listener = None  # optional callable(name, used), called after every change
        self._cond = threading.Condition()

    def room(self) -> float:
        """Bytes that can still be reserved right now."""
        return float("inf") if self.capacity is None else self.capacity - self.used

    def try_reserve(self, nbytes: int) -> bool:
        """Reserve `nbytes` if they fit now; never blocks."""
        with self._cond:
            if self.capacity is not None and self.used + nbytes > self.capacity:
                return False
            self._take(nbytes)
            return True

    def reserve(self, nbytes: int, what: str, wait: float = 0.0) -> None:
        """Reserve `nbytes`, waiting up to `wait` seconds for releases; else raise BudgetError."""
        with self._cond:
            if self.capacity is not None and nbytes > self.capacity:
                raise BudgetError(self._message(nbytes, what))
            fits = self._cond.wait_for(
                lambda: self.capacity is None or self.used + nbytes <= self.capacity, timeout=wait)
            if not fits:
                raise BudgetError(self._message(nbytes, what))
            self._take(nbytes)

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.used -= nbytes
            assert self.used >= 0, f"{self.name} budget released more than it reserved"
            self._cond.notify_all()
            if self.listener is not None:
                self.listener(self.name, self.used)

    def _take(self, nbytes: int) -> None:
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        if self.listener is not None:
            self.listener(self.name, self.used)

    def _message(self, nbytes: int, what: str) -> str:
        return (f"{self.name} budget of {format_size(self.capacity)} cannot hold {what} "
                f"({format_size(nbytes)}; {format_size(self.used)} already in use): "
                f"raise {self.name}_memory or let more state spill to a slower tier")
