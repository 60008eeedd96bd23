"""The one place that names CUDA: streams, events, pinned allocation, memory stats.

Stream discipline (docs/engine.md has the full table). Three lanes run GPU work:

    compute  the stream current where the model runs (forward, backward, clipping, and
             the AdamW of device-homed state: no hand-off at all)
    copy     host -> device: weight fetches, activation copy-in, GPU-side AdamW of host state
    drain    device -> host: gradients, activation copy-out

Every buffer that crosses lanes goes through the helpers below, and nothing else in
tierflow touches streams or events:

* the consumer's lane waits for an event the producer recorded (`wait_event`);
* memory allocated on one lane and used on another is `hand_over`ed to the user's stream
  (`record_stream`), so the caching allocator does not give it to the next allocation on
  the allocating lane while kernels queued on the other lane may still read or write it;
* a host buffer read or written by an async copy is touched by the host only after the
  copy's event has completed (`synchronize_event`).

On a CPU-only machine the compute device is the CPU: every method has a synchronous
fallback, so the engine runs the same code paths everywhere.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
import warnings

import torch


def return_freed_memory_to_os(threshold: int = 1 << 20) -> bool:
    """Make glibc serve allocations >= `threshold` with mmap and give free memory at the top
    of its heap back to the OS once more than 2 * `threshold` of it is free.

    By default glibc raises its mmap threshold after large frees (up to 32 MiB) and its trim
    threshold with it (to twice that), after which the engine's per-step buffers come from
    heaps that keep up to 64 MiB of freed memory resident: resident memory then creeps
    above the budgets although the engine freed everything. Both thresholds are set (fixing
    one alone leaves the other where the process's earlier frees raised it), and what the
    heaps already hold free is trimmed now. Returns False where this is not glibc.
    """
    if sys.platform != "linux":
        return False
    # One setting for the process: the lowest asked for so far (generation asks for less than
    # the engine), so that an engine built after a generate does not undo what it needed.
    threshold = min(threshold, _mmap_threshold or threshold)
    return _set_malloc_thresholds(threshold, trim_now=True)


def _set_malloc_thresholds(threshold: int, trim_now: bool = False) -> bool:
    """glibc's mmap threshold to `threshold` and its trim threshold to twice that (both: fixing
    one alone leaves the other where earlier frees raised it); remembered in `_mmap_threshold`.
    `trim_now`: also give back what the heaps hold free now. False where this is not glibc."""
    global _mmap_threshold
    try:
        libc = ctypes.CDLL("libc.so.6")
        fixed = libc.mallopt(_M_MMAP_THRESHOLD, threshold) and libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold)
        _mmap_threshold = threshold
        if trim_now:
            libc.malloc_trim(0)
        return bool(fixed)
    except (OSError, AttributeError):
        return False


# glibc's largest mmap threshold on 64-bit (half its heap size): the blocks of up to this size
# that a CPU training step frees are kept for the next step (reuse_freed_blocks).
REUSE_BLOCKS_UP_TO = 32 << 20


def reuse_freed_blocks() -> bool:
    """CPU training: let glibc keep the blocks of up to 32 MiB that a step frees and hand them to
    the next step, instead of returning them to the OS and faulting them in again.

    Backward allocates every weight's gradient afresh (the 171 M Llama: 680 MB per step in
    4-31 MiB blocks). Returned to the OS at each free (return_freed_memory_to_os), they cost a
    page fault per 4 KiB at the next backward: measured 240 k faults, 0.5 s of system time and
    0.26 s of backward per step on 2 cores. The device budget bounds the gradients alive at
    once, so what the heap keeps is bounded by it plus the activations and fragmentation
    (measured there: 0.35-0.45 GB more resident memory). Loading and generation lower the
    thresholds again when they run. Returns False where this is not glibc."""
    if sys.platform != "linux":
        return False
    if _mmap_threshold == REUSE_BLOCKS_UP_TO:  # (called at every step: nothing to do after the first)
        return True
    return _set_malloc_thresholds(REUSE_BLOCKS_UP_TO)


def mmap_threshold() -> int | None:
    """The mmap threshold tierflow set last (None: never set; glibc's dynamic default)."""
    return _mmap_threshold


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_mmap_threshold: int | None = None  # what return_freed_memory_to_os or reuse_freed_blocks set last


class ComputeDevice:
    """Wraps the compute device and its copy and drain streams (CUDA) or nothing (CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.is_cuda else None
        self.drain_stream = torch.cuda.Stream(device) if self.is_cuda else None
        self._placeholders: dict[torch.dtype, torch.Tensor] = {}
        self._warned_unpinned = False
        return_freed_memory_to_os()

    def reuse_step_memory(self) -> None:
        """Training: on a CPU the next backward reuses the blocks this step freed
        (`reuse_freed_blocks`); a GPU's come from torch's caching allocator anyway."""
        if not self.is_cuda:
            reuse_freed_blocks()

    # ---- allocation ----------------------------------------------------------------------
    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat uninitialised tensor on the compute device (allocated on the current lane)."""
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

    def host_like(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor with `tensor`'s shape, dtype and strides; pinned on CUDA."""
        return torch.empty_like(tensor, device="cpu", pin_memory=self.is_cuda)

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of `tensor`, complete on return; from a CUDA device through pinned
        memory (torch caches those blocks), since a copy into pageable memory runs at a
        fraction of PCIe speed. Runs on the current lane."""
        if tensor.device.type != "cuda":
            return tensor
        out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        out.copy_(tensor)  # blocking: waits for the lane's queued work
        return out

    def placeholder(self, dtype: torch.dtype) -> torch.Tensor:
        """A 0-dim NaN on the device: parameters whose data lives elsewhere expand it to their
        shape (right shape, dtype and device; one element of memory)."""
        if dtype not in self._placeholders:
            self._placeholders[dtype] = torch.full((), float("nan"), dtype=dtype, device=self.device)
        return self._placeholders[dtype]

    # ---- lanes ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lane(self, name: str):
        """Run the enclosed GPU work on lane 'copy' or 'drain' (the compute lane is whatever
        stream is current where the model runs); a no-op on CPU."""
        stream = self._stream(name)
        if stream is None:
            yield
            return
        with torch.cuda.stream(stream):
            yield

    def _stream(self, name: str):
        if name not in ("copy", "drain"):
            raise ValueError(f"unknown lane {name!r}: 'copy' or 'drain'")
        return {"copy": self.copy_stream, "drain": self.drain_stream}[name]

    # ---- hand-offs --------------------------------------------------------------------------
    def record_event(self):
        """An event marking the work queued so far on the current lane (None on CPU)."""
        if not self.is_cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def wait_event(self, event) -> None:
        """Make the current lane wait for `event` (no host sync)."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def synchronize_event(self, event) -> None:
        """Block the calling host thread until `event` completes."""
        if event is not None:
            event.synchronize()

    def synchronize_lane(self) -> None:
        """Block the calling host thread until everything queued on the current lane is done."""
        self.synchronize_event(self.record_event())

    def hand_over(self, tensor: torch.Tensor, stream=None) -> None:
        """`tensor` was allocated on another lane and is used on `stream` (default: the current
        one): the caching allocator must not reuse its memory before that stream's work queued
        so far is done."""
        if self.is_cuda and tensor.device.type == "cuda":
            tensor.record_stream(stream if stream is not None else torch.cuda.current_stream(self.device))

    def hand_over_to_lane(self, tensor: torch.Tensor, name: str) -> None:
        """`tensor` (allocated on the current lane) will also be used on lane `name`."""
        self.hand_over(tensor, self._stream(name))

    def memory_allocated(self) -> int:
        """Bytes allocated on the device by torch (0 on CPU, where RSS is the measure)."""
        return torch.cuda.memory_allocated(self.device) if self.is_cuda else 0


# ---- CPU threads: OpenMP settings (the compute device is the CPU) -----------------------------
def join_openmp() -> None:
    """Run one small parallel torch op on the calling thread, so that it gets an OpenMP team.

    With the CPU as compute device, libgomp's idle workers spin for ~300k iterations before
    they sleep, unless it manages more threads than there are cores; then they spin briefly.
    When our I/O threads (or other processes) take a core, a spinning worker burns the time
    the compute thread it waits for needs: measured on 2 cores, a 12-token prefill took 4x
    longer. One more team (this thread's) puts libgomp in its short-spin mode. (The staged
    fetch path got it by accident: its copies ran in parallel on the transfer thread.)"""
    torch.empty(1 << 16).fill_(0.0)


@contextlib.contextmanager
def one_openmp_thread(device: torch.device):
    """On a CPU, run the calling thread's torch ops on that thread alone (OpenMP's setting is
    per thread: the compute thread keeps its own). The dequantization runs beside the compute
    thread; were it parallel too, each of its ops would wake a worker of its own team, which
    on a busy core waits to be scheduled (measured on 2 cores: the dequantization ran ~2x
    faster on one thread, with ~5x fewer involuntary context switches)."""
    threads = _openmp() if device.type == "cpu" else None
    if threads is None:
        yield
        return
    get, set_ = threads
    before = get()
    set_(1)
    try:
        yield
    finally:
        set_(before)


@functools.cache
def _openmp():
    """libgomp's (get, set) number of threads of the calling thread, as torch's OpenMP build
    exports them; None where they are not visible (then nothing changes)."""
    try:
        lib = ctypes.CDLL(None)
        return lib.omp_get_max_threads, lib.omp_set_num_threads
    except (OSError, AttributeError, TypeError):  # (TypeError: no process handle, e.g. on Windows)
        return None
