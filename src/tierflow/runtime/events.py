"""An optional log of what the engine did and when, for timelines and profiling.

Disabled by default (one attribute test per event). When enabled, it records
spans (a fetch, an AdamW update, a gradient drain, a module's forward) and
samples of the accounted bytes per tier each time a budget changes.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """Something the engine did: kind is 'forward', 'fetch', 'update' or 'drain'."""

    kind: str
    name: str
    start: float      # seconds since the log was enabled
    end: float
    nbytes: int
    thread: str


@dataclass(frozen=True)
class MemorySample:
    """Accounted bytes of one tier right after it changed."""

    time: float
    tier: str
    used: int


class EventLog:
    """Thread-safe recorder of spans and memory samples."""

    def __init__(self):
        self.enabled = False
        self.spans: list[Span] = []
        self.memory: list[MemorySample] = []
        self._origin = time.perf_counter()
        self._lock = threading.Lock()

    def enable(self) -> None:
        """Start recording from now (clears earlier events)."""
        with self._lock:
            self.spans, self.memory = [], []
            self._origin = time.perf_counter()
            self.enabled = True

    def now(self) -> float:
        return time.perf_counter() - self._origin

    @contextlib.contextmanager
    def span(self, kind: str, name: str, nbytes: int = 0):
        """Record the enclosed work as one span (no cost when disabled)."""
        if not self.enabled:
            yield
            return
        start = self.now()
        try:
            yield
        finally:
            self.add(Span(kind, name, start, self.now(), nbytes, threading.current_thread().name))

    def add(self, span: Span) -> None:
        with self._lock:
            self.spans.append(span)

    def budget_changed(self, tier: str, used: int) -> None:
        """Budget listener: sample the tier's accounted bytes."""
        if self.enabled:
            with self._lock:
                self.memory.append(MemorySample(self.now(), tier, used))


class IoCounters:
    """Bytes moved between the device and the host since the engine was built, counted from
    any thread (engine.io_stats adds the NVMe store's own)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.totals = {"host_to_device": 0, "device_to_host": 0}

    def count(self, key: str, nbytes: int) -> None:
        """Add `nbytes` to 'host_to_device' or 'device_to_host'."""
        with self._lock:
            self.totals[key] += nbytes
