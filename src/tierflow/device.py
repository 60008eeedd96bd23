"""The one place that names CUDA: streams, events, pinned allocation, memory stats.

On a CPU-only machine the compute device is the CPU: every method has a
synchronous fallback, so the engine runs the same code paths everywhere.
"""
from __future__ import annotations

import contextlib
import ctypes
import sys
import warnings

import torch


def return_freed_memory_to_os(threshold: int = 1 << 20) -> bool:
    """Make glibc serve allocations >= `threshold` with mmap, so freeing them returns the
    memory to the OS at once.

    By default glibc raises its mmap threshold after large frees (up to 32 MiB), after
    which the engine's per-step buffers come from per-thread heaps that are never trimmed:
    resident memory then creeps above the budgets although the engine freed everything.
    Returns False where this is not glibc (nothing to do).
    """
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


_M_MMAP_THRESHOLD = -3


class ComputeDevice:
    """Wraps the compute device and its copy stream (CUDA) or nothing (CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.is_cuda else None
        self._placeholders: dict[torch.dtype, torch.Tensor] = {}
        self._warned_unpinned = False
        return_freed_memory_to_os()

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat uninitialised tensor on the compute device."""
        return torch.empty(numel, dtype=dtype, device=self.device)

    def host_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat host tensor, pinned when the device is CUDA (fast, async H2D copies)."""
        if self.is_cuda:
            try:
                return torch.empty(numel, dtype=dtype, pin_memory=True)
            except RuntimeError as exc:  # pinned-memory exhaustion or `ulimit -l`: stay correct
                if not self._warned_unpinned:
                    self._warned_unpinned = True
                    warnings.warn(f"cannot pin host memory ({exc}); host-resident state uses "
                                  f"pageable memory, so host-device copies are slower. Raise "
                                  f"`ulimit -l` or lower host_memory to keep it pinned.")
        return torch.empty(numel, dtype=dtype)

    def placeholder(self, dtype: torch.dtype) -> torch.Tensor:
        """A 0-dim NaN on the device: parameters whose data lives elsewhere expand it to their
        shape (right shape, dtype and device; one element of memory)."""
        if dtype not in self._placeholders:
            self._placeholders[dtype] = torch.full((), float("nan"), dtype=dtype, device=self.device)
        return self._placeholders[dtype]

    @contextlib.contextmanager
    def side_stream(self):
        """Run the enclosed copies on the copy stream (CUDA); a no-op on CPU."""
        if self.copy_stream is None:
            yield
            return
        with torch.cuda.stream(self.copy_stream):
            yield

    def record_event(self):
        """An event marking the work queued so far on the current stream (None on CPU)."""
        if not self.is_cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def wait_event(self, event) -> None:
        """Make the compute stream wait for `event` (no host sync)."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def synchronize_event(self, event) -> None:
        """Block the calling host thread until `event` completes."""
        if event is not None:
            event.synchronize()

    def mark_used_by_compute(self, tensor: torch.Tensor) -> None:
        """Tell the caching allocator that the compute stream uses a side-stream allocation."""
        if self.is_cuda:
            tensor.record_stream(torch.cuda.current_stream(self.device))

    def memory_allocated(self) -> int:
        """Bytes allocated on the device by torch (0 on CPU, where RSS is the measure)."""
        return torch.cuda.memory_allocated(self.device) if self.is_cuda else 0
