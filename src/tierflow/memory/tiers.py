"""Where each unit's training state lives, and uniform access to it.

A unit's state is a handful of flat arrays:

    master      fp32, all parameters            (the optimizer's copy)
    weights     compute dtype, all parameters   (only when it differs from fp32)
    grad        fp32, trainable prefix          (accumulated across micro-batches)
    exp_avg     fp32, trainable prefix          (Adam first moment)
    exp_avg_sq  fp32, trainable prefix          (Adam second moment)

Each array lives in the unit's home tier: a tensor in device memory, a tensor in
host memory (pinned on CUDA), or an extent of the NVMe spill file. `StateIO.open`
gives a window of element range [start, start+numel) of some arrays as tensors
(a slice for memory tiers; a staging buffer read from disk for NVMe) and
`StateIO.close` writes changed windows back, so the optimizer and gradient
code never branches on the tier.

With data-parallel ranks (distributed.py) a rank's arrays hold only its shard,
elements [base, limit) of the unit's flat buffers. Callers keep using unit-wide
element offsets: `pieces` clips every range to the shard and windows translate
offsets, so the optimizer, gradient and checkpoint code is unchanged.
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from tierflow.core.layout import ALIGN, ARRAY_CLASS, FP32, Unit, array_specs  # noqa: F401 (re-exported)
from tierflow.memory.budget import Budget
from tierflow.memory.device import ComputeDevice
from tierflow.memory.nvme import Extent, NvmeStore
from tierflow.memory.pool import BufferPool, aligned_empty

READ_AHEAD = 3  # staging buffers read ahead when a whole array is copied out (weights fetch)


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


@dataclass
class UnitState:
    """The home tier of one unit and handles to its arrays there."""

    home: str                                   # "device" | "host" | "nvme"
    arrays: dict = field(default_factory=dict)  # name -> Tensor (memory tiers) or Extent (nvme)
    dtypes: dict = field(default_factory=dict)  # name -> dtype
    base: int = 0                               # unit element held at index 0 of the arrays
    limit: int | None = None                    # end of this rank's shard (None: whole unit)

    def key(self, name: str) -> str:
        """The array that holds `name`: a frozen unit's 'master' is its compute-dtype weights."""
        return "weights" if name == "master" and name not in self.arrays else name

    def nbytes(self, name: str) -> int:
        array = self.arrays[name]
        if isinstance(array, Extent):
            return array.nbytes
        return array.numel() * array.element_size()


class StateIO:
    """Allocates unit state in its home tier and opens windows onto it."""

    def __init__(self, device: ComputeDevice, budgets: dict[str, Budget],
                 nvme: NvmeStore | None, pool: BufferPool | None):
        self.device = device
        self.budgets = budgets
        self.nvme = nvme
        self.pool = pool

    # ---- allocation -------------------------------------------------------------------
    def allocate(self, unit: Unit, home: str, compute_dtype: torch.dtype, shard=None) -> UnitState:
        """Allocate every array of `unit` (or of its `shard`) in `home`, accounting memory tiers
        in their budgets."""
        state = UnitState(home) if shard is None else UnitState(home, base=shard.lo, limit=shard.hi)
        specs = array_specs(unit, compute_dtype, shard)
        for name, (numel, dtype) in specs.items():
            nbytes = numel * dtype.itemsize
            if home == "nvme":
                state.arrays[name] = self.nvme.allocate(_round_up(nbytes, ALIGN))
            else:
                self.budgets[home].reserve(nbytes, f"{ARRAY_CLASS[name]} of {unit.name}")
                if home == "device":
                    tensor = self.device.empty(numel, dtype)
                else:
                    tensor = self.device.host_empty(numel, dtype)
                if name in ("grad", "exp_avg", "exp_avg_sq"):
                    tensor.zero_()
                state.arrays[name] = tensor
            state.dtypes[name] = dtype
        if home == "nvme" and "grad" in specs:
            self._zero_moments(state, unit.trainable_numel)
        return state

    def _zero_moments(self, state: UnitState, numel: int) -> None:
        for start, count in self.pieces(state, 0, numel):
            window = self.open(state, ("exp_avg", "exp_avg_sq"), start, count, read=False)
            for view in window.views:
                view.zero_()
            self.close(window, write=("exp_avg", "exp_avg_sq"))

    def free(self, state: UnitState) -> None:
        for name, array in state.arrays.items():
            if isinstance(array, Extent):
                self.nvme.free(array)
            else:
                self.budgets[state.home].release(array.numel() * array.element_size())
        state.arrays.clear()

    # ---- windows ----------------------------------------------------------------------
    def piece_elements(self, state: UnitState | None = None) -> int:
        """Largest NVMe window, in elements, that one staging buffer holds for fp32 arrays (for
        a compressed unit's byte array: a whole staging buffer, memory/packed.py)."""
        if self.pool is None:
            return 1 << 62
        if state is not None and set(state.dtypes.values()) == {torch.uint8}:
            return self.pool.nbytes // ALIGN * ALIGN
        return self.pool.nbytes // 4 // 2048 * 2048

    def pieces(self, state: UnitState, start: int, numel: int):
        """Split [start, start+numel) into windows: one for memory tiers (whole parameters keep
        torch's kernels at full speed), staging-buffer-sized ones for NVMe."""
        end = start + numel
        if state.limit is not None:  # a rank's shard: only its part of the range
            start, end = max(start, state.base), min(end, state.limit)
        step = self.piece_elements(state) if state.home == "nvme" else max(end - start, 1)
        for offset in range(start, end, step):
            yield offset, min(step, end - offset)

    def open(self, state: UnitState, names, start: int, numel: int, read: bool = True,
             wait: bool = True, packed: dict | None = None) -> "Window":
        """A window onto elements [start, start+numel) of the named arrays. With wait=False
        the NVMe reads are only started: call `window.wait()` before touching the views.

        `packed` (name -> a 2-byte dtype) views an fp32 array in its packed form: element i as
        that dtype at byte 2*i, in the array's first half (a gradient kept in the compute dtype,
        gradients.py): half the bytes read and written."""
        names = tuple(state.key(n) for n in names)
        packed = packed or {}
        if state.home != "nvme":
            local = start - state.base
            arrays = [state.arrays[n] if n not in packed else state.arrays[n].view(packed[n]) for n in names]
            return Window(state, tuple(names), start, [a[local:local + numel] for a in arrays])
        window = Window(state, tuple(names), start, [], [])
        try:
            for name in names:
                dtype = packed.get(name, state.dtypes[name])
                buf = self.pool.acquire()
                window.buffers.append(buf)
                window.views.append(buf[:numel * dtype.itemsize].view(dtype))
                if read:
                    nbytes = _round_up(numel * dtype.itemsize, ALIGN)
                    window.reads.append(self.nvme.read_async(state.arrays[name], buf[:nbytes],
                                                             (start - state.base) * dtype.itemsize))
            if wait:
                window.wait()
        except BaseException:
            self.discard(window)
            raise
        return window

    def discard(self, window: "Window") -> None:
        """Give a window's buffers back without writing (after its reads have settled)."""
        for future in window.reads:
            future.exception()  # in-flight reads must finish before their buffers are reused
        for buf in window.buffers:
            self.pool.release(buf)
        window.buffers = []

    def close(self, window: "Window", write=(), wait: bool = True) -> list:
        """Write back the arrays named in `write` and give the buffers back (each as soon as its
        write is done). With wait=False returns the write futures instead of waiting."""
        if not window.buffers:
            return []
        writes = []
        for name, view, buf in zip(window.names, window.views, window.buffers):
            if name not in write:
                self.pool.release(buf)
                continue
            itemsize = view.element_size()  # (a packed view's, not the array's)
            nbytes = _round_up(view.numel() * itemsize, ALIGN)
            try:
                future = self.nvme.write_async(window.state.arrays[name], buf[:nbytes],
                                               (window.start - window.state.base) * itemsize)
            except BaseException:
                self.pool.release(buf)
                raise
            future.add_done_callback(lambda _f, b=buf: self.pool.release(b))
            writes.append(future)
        window.buffers = []
        if wait:
            wait_all(writes)
            return []
        return writes

    def windows(self, state: UnitState, names, ranges, read: bool = True, ahead: int = 1, spare: int = 0,
                packed: dict | None = None):
        """Yield open windows over consecutive (start, numel) ranges, reading up to `ahead`
        windows beyond the one the caller works on. The caller closes each window; `spare`:
        staging buffers it takes besides, per window, before closing it. Fewer windows are read
        ahead when the staging pool could not hold them all at once (it would wait forever).
        `packed`: as for `open`."""
        ranges = list(ranges)
        if state.home == "nvme" and self.pool is not None:
            ahead = max(0, min(ahead, (self.pool.count - spare) // len(names) - 1))
        opened = []
        try:
            for i in range(len(ranges)):
                while len(opened) < ahead + 1 and i + len(opened) < len(ranges):
                    opened.append(self.open(state, names, *ranges[i + len(opened)], read=read, wait=False,
                                            packed=packed))
                current = opened.pop(0)
                try:
                    current.wait()
                except BaseException:
                    self.discard(current)
                    raise
                yield current
        finally:
            for window in opened:  # abandoned early: give the read-ahead buffers back
                self.discard(window)

    def read_into(self, state: UnitState, name: str, dst: torch.Tensor) -> None:
        """Copy a whole array into `dst` (same numel, any dtype/device), piece by piece, the
        next pieces' reads overlapping the current piece's copy. Several reads in flight keep
        the disk's queue full (measured: one ahead reached ~60% of fio's bandwidth)."""
        for _ in self.read_progressively(state, name, dst):
            pass

    def read_progressively(self, state: UnitState, name: str, dst: torch.Tensor):
        """`read_into`, yielding after each piece how many leading elements of `dst` are filled
        (the next pieces' reads stay in flight meanwhile: a caller may work on what arrived)."""
        ahead = 1 if self.pool is None else max(1, min(READ_AHEAD, self.pool.count - 2))
        for window in self.windows(state, (name,), self.pieces(state, 0, dst.numel()), ahead=ahead):
            try:
                end = window.start + window.views[0].numel()
                dst[window.start:end].copy_(window.views[0], non_blocking=True)
                if window.buffers:
                    # The staging buffer goes back to the pool: the copy must have finished.
                    self.device.synchronize_event(self.device.record_event())
            finally:
                self.close(window)
            yield end

    def read_ranges(self, state: UnitState, name: str, ranges, into: list | None = None) -> tuple[list, int]:
        """Elements [start, start + numel) of an array for each (start, numel) of `ranges` (e.g.
        some experts' rows of fused parameters), as new tensors on the device (or written into
        the flat tensors `into`, one per range), and the bytes read from the home. NVMe ranges
        are widened to the O_DIRECT alignment; on a CPU they are read straight into aligned
        buffers (or into `into` itself where it is aligned too), all in flight at once (no
        staging copy); for a GPU they go through the staging buffers in one pipeline of reads."""
        name = state.key(name)
        dtype = state.dtypes[name]
        out = into if into is not None else [self.device.empty(numel, dtype) for _, numel in ranges]
        if state.home != "nvme":
            for (start, numel), dst in zip(ranges, out):
                local = start - state.base
                dst.copy_(state.arrays[name][local:local + numel], non_blocking=True)
            return out, sum(numel for _, numel in ranges) * dtype.itemsize
        align = ALIGN // dtype.itemsize
        spans = [(start // align * align, _round_up(start + numel, align)) for start, numel in ranges]
        nbytes = sum(hi - lo for lo, hi in spans) * dtype.itemsize
        if not self.device.is_cuda:
            return self._read_spans_direct(state, name, ranges, spans, into), nbytes
        pieces, owners = [], []
        for i, (lo, hi) in enumerate(spans):
            for piece in self.pieces(state, lo, hi - lo):
                pieces.append(piece)
                owners.append(i)
        ahead = 1 if self.pool is None else max(1, min(READ_AHEAD, self.pool.count - 2))
        for window, i in zip(self.windows(state, (name,), pieces, ahead=ahead), owners):
            (start, numel), dst = ranges[i], out[i]
            try:
                a, b = max(start, window.start), min(start + numel, window.start + window.views[0].numel())
                dst[a - start:b - start].copy_(window.views[0][a - window.start:b - window.start], non_blocking=True)
                self.device.synchronize_event(self.device.record_event())  # the staging buffer goes back
            finally:
                self.close(window)
        return out, nbytes

    def _read_spans_direct(self, state: UnitState, name: str, ranges, spans, into: list | None) -> list:
        """CPU: read each aligned span of an NVMe array with O_DIRECT, all in flight at once:
        into `into[i]` itself when the span is exactly the range and the tensor is aligned (no
        copy, no fresh memory), else into a fresh aligned buffer (then copied into `into[i]`)."""
        dtype, extent = state.dtypes[name], state.arrays[name]
        targets, reads = [], []
        for i, ((start, numel), (lo, hi)) in enumerate(zip(ranges, spans)):
            dst = None if into is None else into[i]
            if dst is None or (lo, hi) != (start, start + numel) or not takes_direct_reads(dst):
                dst = aligned_empty((hi - lo) * dtype.itemsize).view(dtype)
            targets.append(dst)
            reads.append(self.nvme.read_async(extent, dst.view(torch.uint8), (lo - state.base) * dtype.itemsize))
        wait_all(reads)
        views = [buf[start - lo:start - lo + numel] for (start, numel), (lo, _), buf in zip(ranges, spans, targets)]
        if into is None:
            return views
        for dst, view in zip(into, views):
            if dst.data_ptr() != view.data_ptr():
                dst.copy_(view)
        return into

    # ---- direct whole-array reads (gendisk: generation at the disk's speed) ------------------
    def reads_whole(self, state: UnitState, name: str, dtype: torch.dtype) -> bool:
        """True when `read_whole_async` can read array `name` straight into a CPU tensor of
        `dtype`: an NVMe array of a whole unit (not a rank's shard), no conversion."""
        name = state.key(name)
        return (state.home == "nvme" and self.nvme is not None and state.limit is None
                and state.base == 0 and state.dtypes.get(name) == dtype)

    def read_whole_async(self, state: UnitState, name: str, dst: torch.Tensor) -> Future:
        """Start reading the whole NVMe array `name` into `dst`, a CPU tensor from
        `aligned_flat`, without staging buffers or a copy: the NVMe threads read it in
        chunk-sized requests, all in flight at once. Returns the read's future."""
        extent = state.arrays[state.key(name)]
        nbytes = _round_up(dst.numel() * dst.element_size(), ALIGN)
        if not takes_direct_reads(dst) or nbytes > extent.nbytes:
            raise ValueError("read_whole_async needs a CPU tensor from aligned_flat of at most the array's size")
        raw = torch.empty(0, dtype=torch.uint8).set_(dst.untyped_storage(), dst.storage_offset() * dst.element_size(),
                                                     (nbytes,))
        return self.nvme.read_async(extent, raw)

    def write_from(self, state: UnitState, name: str, src: torch.Tensor, start: int = 0) -> None:
        """Copy `src` (flat) into elements [start, start+numel) of an array, piece by piece."""
        name = state.key(name)
        for offset, count in self.pieces(state, start, src.numel()):
            window = self.open(state, (name,), offset, count, read=False)
            try:
                window.views[0].copy_(src[offset - start:offset - start + count])
            except BaseException:
                self.close(window)
                raise
            self.close(window, write=(name,))


def aligned_flat(numel: int, dtype: torch.dtype, alignment: int = ALIGN) -> torch.Tensor:
    """A flat CPU tensor whose data starts on an `alignment` boundary and whose storage reaches
    past its end to the next boundary: a target for O_DIRECT reads of whole arrays (`aligned_empty`:
    2 MiB-aligned, huge pages, from 8 MiB: measured 2.7-3.0 GB/s read against 1.6 with 4 KiB pages)."""
    nbytes = numel * dtype.itemsize
    return aligned_empty(_round_up(max(nbytes, 1), alignment), alignment)[:nbytes].view(dtype)


def takes_direct_reads(flat: torch.Tensor) -> bool:
    """True for a CPU tensor like those of `aligned_flat`: O_DIRECT can read whole arrays into it."""
    nbytes = _round_up(flat.numel() * flat.element_size(), ALIGN)
    return (flat.device.type == "cpu" and flat.is_contiguous() and flat.data_ptr() % ALIGN == 0
            and flat.untyped_storage().nbytes() >= flat.storage_offset() * flat.element_size() + nbytes)


@dataclass
class Window:
    """Views of a range of some arrays of one unit; `buffers` are staging buffers (NVMe only)."""

    state: UnitState
    names: tuple
    start: int
    views: list
    buffers: list = field(default_factory=list)
    reads: list = field(default_factory=list)   # in-flight read futures (NVMe)

    def wait(self) -> None:
        """Block until the window's reads are done."""
        wait_all(self.reads)
        self.reads = []


def wait_all(futures) -> None:
    """Wait for every future, then raise the first error (none is left running)."""
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
