"""A stand-in for `tierflow.memory.device.ComputeDevice` that takes the CUDA code paths on a CPU and
records every lane operation, so the stream discipline (docs/engine.md) can be checked
without a GPU: which lane allocated each device buffer, which events each lane waited for,
which lane ran each AdamW update.

Races themselves cannot happen on a CPU; what this proves is that every hand-off the
engine makes is ordered the way the table in docs/engine.md says. A GPU with a lagging
compute stream (tests/test_cuda_lagging.py) checks the same rules for real.
"""
from __future__ import annotations

import contextlib
import itertools
import threading

import torch

from tierflow.memory.device import ComputeDevice


class RecordedEvent:
    """An event: which lane recorded it, and when (a global sequence number)."""

    def __init__(self, lane: str, seq: int):
        self.lane, self.seq = lane, seq

    def synchronize(self) -> None:
        pass


class RecordingDevice(ComputeDevice):
    """CPU tensors, CUDA control flow (`is_cuda` True), every lane operation logged."""

    log: list = []  # (seq, thread name, lane, op, detail); class-wide: the engine makes its own

    def __init__(self, device: torch.device):
        super().__init__(torch.device("cpu"))
        self.is_cuda = True  # take the GPU paths: lanes, inline device-homed updates, gates
        self._local = threading.local()
        self._seq = itertools.count()
        self._lock = threading.Lock()

    # ---- recording ----------------------------------------------------------------------
    def current_lane(self) -> str:
        stack = getattr(self._local, "stack", None)
        if stack:
            return stack[-1]
        # Outside any lane: the main thread and autograd's run the model (compute); any other
        # thread would queue on the CUDA default stream, ordered with nothing: flagged.
        name = threading.current_thread().name
        return "compute" if name == "MainThread" or "tierflow" not in name else "worker-default"

    def _record(self, op: str, detail=None) -> int:
        with self._lock:
            seq = next(self._seq)
            self.log.append((seq, threading.current_thread().name, self.current_lane(), op, detail))
        return seq

    # ---- ComputeDevice interface, on the CPU ----------------------------------------------
    def empty(self, numel, dtype):
        tensor = torch.empty(numel, dtype=dtype)
        self._record("alloc", tensor.untyped_storage().data_ptr())
        return tensor

    def host_empty(self, numel, dtype):
        return torch.empty(numel, dtype=dtype)

    def host_like(self, tensor):
        return torch.empty_like(tensor, device="cpu")

    def to_host(self, tensor):
        return tensor

    @contextlib.contextmanager
    def lane(self, name):
        assert name in ("copy", "drain"), name
        stack = self._local.__dict__.setdefault("stack", [])
        stack.append(name)
        try:
            yield
        finally:
            stack.pop()

    def record_event(self):
        event = RecordedEvent(self.current_lane(), 0)
        event.seq = self._record("record", event)
        return event

    def wait_event(self, event):
        if event is not None:
            self._record("wait", event)

    def synchronize_event(self, event):
        if event is not None:
            self._record("sync", event)

    def hand_over(self, tensor, stream=None):
        self._record("hand_over", (tensor.untyped_storage().data_ptr(), stream or self.current_lane()))

    def hand_over_to_lane(self, tensor, name):
        self.hand_over(tensor, name)

    def note_update(self, home: str) -> None:
        self._record("update", home)


def recorded_updates(apply_updates, device_of):
    """Wrap `optim.apply_updates` so each call logs the lane it ran on and the unit's home."""
    def wrapped(io, device, state, *args, **kwargs):
        on_device = len(args) > 2 and args[2] is not None  # (pending, flat, scratch): DeviceAdamW
        device_of().note_update(state.home + ("/device-adamw" if on_device else ""))
        return apply_updates(io, device, state, *args, **kwargs)
    return wrapped
