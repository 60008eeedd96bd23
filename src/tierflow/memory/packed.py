"""Compressed frozen weights in their tier: written quantized, read back dequantized on the device.

A compressed unit (core/quant.py) keeps one byte array, 'qweights', in its home tier (device,
host or an NVMe extent, through `StateIO` like any array). Loading quantizes one parameter at
a time as it streams in (`write_slot`), so no more than one parameter is ever held
uncompressed. A fetch (`fetch_into`) brings the unit's compressed bytes to the compute
device, where they are dequantized into the unit's flat buffer: the bytes that cross the
disk and the host-device link are the compressed ones, and the arithmetic runs where the
compute happens (the GPU when there is one, on the copy lane the fetch runs on).

On a CPU compute device (frozen units) the fetch is split in two (`start_read`, then
`dequantize_read` on the transfer thread): the whole array is read straight into a kept,
aligned buffer, with the reads of the next units in flight and read ahead of the prefetch
window (`read_ahead`), then dequantized on one OpenMP thread into a reused unit buffer. The
profile that led there (2 cores, int8, 8 decode steps with every unit on NVMe): fresh unit
buffers cost 2.5 M page faults (more system time than the arithmetic), and reads started one
unit ahead left the dequantization waiting for the disk a third of the time.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future

import torch

from tierflow.core import quant
from tierflow.errors import ConfigError
from tierflow.memory.device import one_openmp_thread
from tierflow.memory.tiers import StateIO, UnitState, aligned_flat

ARRAY = "qweights"
CHUNK = 1 << 18       # elements (de)quantized at a time on a CPU: each chunk stays in the cache
GPU_CHUNK = 1 << 22   # on a GPU: fewer, larger kernels (the temporaries are 16 MiB at most)
KEEP_READ_BUFFERS = 32  # per size at most: compressed-read buffers kept for the next fetches (CPU)


def write_slot(io: StateIO, state: UnitState, unit, index: int, value: torch.Tensor,
               compute_dtype: torch.dtype) -> None:
    """Quantize parameter `index` of `unit` (its full value, any device) into the unit's array;
    on the compute device (a GPU quantizes much faster than the host)."""
    slot = unit.slots[index]
    where = quant.layout(unit, compute_dtype)[index]
    data = quantize(value.detach().to(io.device.device), unit.weights, compute_dtype, name=slot.name)
    io.write_from(state, ARRAY, data, where.offset)


class PackedWeights:
    """Fetches of compressed units: their bytes to the device, dequantized there. The
    dequantization runs on the transfer thread only (one fetch at a time), so its scratch and
    device buffer need no lock; on a GPU every use is ordered on the copy lane, so a buffer is
    refilled only after the kernels reading it. Reads (CPU) start on the compute thread; the
    kept read buffers are shared with the transfer thread under `lock`."""

    def __init__(self, io: StateIO, compute_dtype: torch.dtype):
        self.io, self.compute_dtype = io, compute_dtype
        self.buffer = None   # compressed bytes on the device, grown to the largest unit
        self.scratch = {}    # dequantization scratch (dequantize)
        self.layouts = {}    # unit id -> quant.layout
        self.read_buffers: dict[int, list] = {}  # nbytes -> aligned buffers for direct reads (CPU)
        self.ahead: dict[int, tuple] = {}  # unit id -> (read future, buffer): read before its fetch
        self.lock = threading.Lock()

    # ---- CPU compute device: whole compressed arrays read at once, dequantized in place --------
    def reads_direct(self, state: UnitState) -> bool:
        """The unit's compressed array can be dequantized from where it is read whole (CPU
        compute device): an NVMe array read straight into an aligned buffer, or a host one."""
        array = state.arrays.get(ARRAY)
        return self.io.reads_whole(state, ARRAY, torch.uint8) or (
            isinstance(array, torch.Tensor) and array.device.type == "cpu" and state.limit is None)

    def start_read(self, state: UnitState, uid: int) -> tuple[Future | None, torch.Tensor]:
        """Start reading unit `uid`'s whole compressed array (an NVMe one: into a reused aligned
        buffer, on the NVMe threads, with the other units' reads; a host one is already there),
        unless `read_ahead` has. Returns (the read's future or None, the bytes); hand both to
        `dequantize_read`. (The fetch's device reservation covers the bytes from here on.)"""
        array = state.arrays[ARRAY]
        if isinstance(array, torch.Tensor):
            return None, array
        if uid in self.ahead:
            reading, data = self.ahead.pop(uid)
            self.io.budgets["host"].release(data.numel())
            return reading, data
        return self._read_whole(state)

    def read_ahead(self, state: UnitState, uid: int) -> bool:
        """Start reading unit `uid`'s compressed NVMe array before its fetch, into host memory
        (reserved in the host budget until the fetch takes it): compressed bytes are small, so
        reads can run far ahead of the device buffers and the disk never waits for room.
        False when the host budget has no room for it."""
        if uid in self.ahead or isinstance(state.arrays[ARRAY], torch.Tensor):  # (a host array is there)
            return True
        nbytes = state.nbytes(ARRAY)
        data = self._take_buffer(nbytes)
        if not self.io.budgets["host"].try_reserve(nbytes):
            if data is not None:
                self._keep(data)
            return False
        try:
            self.ahead[uid] = self._read_whole(state, data)
        except BaseException:
            self.io.budgets["host"].release(nbytes)
            raise
        return True

    def _read_whole(self, state: UnitState, data: torch.Tensor | None = None) -> tuple[Future, torch.Tensor]:
        if data is None:
            data = self._take_buffer(state.nbytes(ARRAY))
        if data is None:
            data = aligned_flat(state.nbytes(ARRAY), torch.uint8)
        try:
            return self.io.read_whole_async(state, ARRAY, data), data
        except BaseException:
            self._keep(data)
            raise

    def _take_buffer(self, nbytes: int) -> torch.Tensor | None:
        """A kept read buffer of `nbytes` (its bytes leave the host budget), or None."""
        with self.lock:
            kept = self.read_buffers.get(nbytes)
            data = kept.pop() if kept else None
        if data is not None:
            self.io.budgets["host"].release(nbytes)
        return data

    def close(self) -> None:
        """Let the reads started ahead finish and give their host memory back, with the kept
        read buffers'."""
        for reading, data in self.ahead.values():
            reading.exception()
            self.io.budgets["host"].release(data.numel())
        self.ahead.clear()
        for nbytes in list(self.read_buffers):
            while self._take_buffer(nbytes) is not None:
                pass

    def dequantize_read(self, unit, reading: Future | None, data: torch.Tensor, flat: torch.Tensor) -> int:
        """After `start_read`: wait for the bytes, dequantize every parameter into `flat` and
        keep the read buffer for the next fetch. Returns the bytes moved (the compressed ones)."""
        try:
            if reading is not None:
                reading.result()
            with one_openmp_thread(data.device):
                for slot, where in zip(unit.slots, self._layout(unit)):
                    self._dequantize(unit, slot, where, data, flat)
        finally:
            if reading is not None:
                self._keep(data)
        return data.numel()

    def _keep(self, data: torch.Tensor) -> None:
        """Units repeat their sizes layer after layer: a read buffer is kept for the next unit
        of its size (fresh memory would cost a page fault per 4 KiB at every fetch), as long
        as the host budget has room for it (its bytes stay reserved there while kept)."""
        with self.lock:
            kept = self.read_buffers.setdefault(data.numel(), [])
            if len(kept) < KEEP_READ_BUFFERS and self.io.budgets["host"].try_reserve(data.numel()):
                kept.append(data)

    def fetch_into(self, state: UnitState, unit, flat: torch.Tensor) -> int:
        """Dequantize the unit's weights into `flat` (its device buffer, compute dtype) on the
        device (a GPU; a CPU takes start_read / dequantize_read); returns the bytes moved to
        get them there. Each parameter is dequantized as
        soon as its bytes have arrived, while the reads of the next ones are in flight."""
        slots = list(zip(unit.slots, self._layout(unit)))
        array = state.arrays[ARRAY]
        if isinstance(array, torch.Tensor) and array.device == flat.device:  # already there
            for slot, where in slots:
                self._dequantize(unit, slot, where, array, flat)
            return array.numel()
        nbytes = state.nbytes(ARRAY)  # (whole slots of 4 KiB: as an NVMe extent holds them)
        if self.buffer is None or self.buffer.numel() < nbytes or self.buffer.device != flat.device:
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=flat.device)
        data, done = self.buffer[:nbytes], 0
        for arrived in self.io.read_progressively(state, ARRAY, data):
            while done < len(slots) and slots[done][1].offset + slots[done][1].nbytes <= arrived:
                self._dequantize(unit, *slots[done], data, flat)
                done += 1
        return nbytes

    def _dequantize(self, unit, slot, where, data: torch.Tensor, flat: torch.Tensor) -> None:
        piece = data[where.offset:where.offset + where.nbytes]
        target = flat[slot.offset:slot.offset + slot.numel]
        if where.quantized:
            dequantize(piece, slot.numel, unit.weights, target, self.scratch)
        else:
            target.copy_(piece.view(self.compute_dtype))

    def read_slot(self, state: UnitState, unit, index: int) -> torch.Tensor:
        """Parameter `index` dequantized, as a new fp32 CPU tensor of its shape."""
        slot, where = unit.slots[index], self._layout(unit)[index]
        data = torch.empty(where.nbytes, dtype=torch.uint8)
        self._read(state, data, where.offset)
        if not where.quantized:
            return data.view(self.compute_dtype).to(torch.float32).view(slot.shape)
        out = torch.empty(slot.numel, dtype=self.compute_dtype)
        dequantize(data, slot.numel, unit.weights, out)
        return out.to(torch.float32).view(slot.shape)

    def _layout(self, unit) -> list:
        if unit.uid not in self.layouts:
            self.layouts[unit.uid] = quant.layout(unit, self.compute_dtype)
        return self.layouts[unit.uid]

    def _read(self, state: UnitState, out: torch.Tensor, offset: int) -> None:
        """Bytes [offset, offset + out.numel()) of the unit's array into `out` (CPU)."""
        for start, count in self.io.pieces(state, offset, out.numel()):
            window = self.io.open(state, (ARRAY,), start, count)
            try:
                out[start - offset:start - offset + count].copy_(window.views[0])
            finally:
                self.io.close(window)


def refuse_write(unit, name: str) -> None:
    """Compressed weights are loaded once; overwriting them (resume) is not supported."""
    raise ConfigError(f"the weights of {unit.name} are stored compressed ({unit.weights}); '{name}' cannot "
                      f"be overwritten: build the engine from the new weights instead")


# ---- the arithmetic (formats: core/quant.py) ----------------------------------------------------
def quantize(value: torch.Tensor, fmt: str, compute_dtype: torch.dtype, name: str = "tensor") -> torch.Tensor:
    """One parameter's bytes in the compressed array (uint8, `slot_bytes` long, on `value`'s
    device), computed CHUNK elements at a time so the temporaries stay small."""
    flat = value.detach().reshape(-1)
    if not quant.is_quantized(value.shape):
        return flat.to(compute_dtype).view(torch.uint8).clone()
    numel = flat.numel()
    ncodes = quant.code_bytes(numel, fmt)
    out = torch.empty(ncodes + quant.scale_bytes(numel), dtype=torch.uint8, device=flat.device)
    codes, scales = out[:ncodes], out[ncodes:].view(quant.SCALE_DTYPE)
    levels = torch.tensor(quant.NF4_LEVELS, device=flat.device)
    bounds = (levels[1:] + levels[:-1]) / 2  # nearest level: the bucket between midpoints
    for start in range(0, numel, CHUNK):
        groups = flat[start:start + CHUNK].to(torch.float32).view(-1, quant.GROUP)
        absmax = groups.abs().amax(dim=1, keepdim=True)
        scale = absmax / 127 if fmt == "int8" else absmax
        if not torch.isfinite(scale).all() or scale.max() > quant.FP16_MAX:
            raise ConfigError(f"weights={fmt!r}: {name} has values beyond what fp16 scales hold (|w| up to "
                              f"{absmax.max().item():.3g}): load it uncompressed")
        scale = scale.to(quant.SCALE_DTYPE)
        scales[start // quant.GROUP:start // quant.GROUP + scale.numel()] = scale.view(-1)
        divisor = torch.where(scale == 0, 1.0, scale.float())  # an all-zero group stays zero
        if fmt == "int8":
            chunk = torch.round(groups / divisor).clamp_(-127, 127).to(torch.int8).view(torch.uint8).reshape(-1)
            codes[start:start + chunk.numel()] = chunk
        else:
            nearest = torch.bucketize((groups / divisor).reshape(-1), bounds).to(torch.uint8)
            codes[start // 2:start // 2 + nearest.numel() // 2] = (nearest[0::2] << 4) | nearest[1::2]
    return out


def nf4_pair_table(device) -> torch.Tensor:
    """Byte -> its two NF4 levels (high nibble first), as 256 float64 cells of two fp32 each:
    one index_select per byte dequantizes two weights (measured ~4x a per-nibble lookup on CPU)."""
    levels = torch.tensor(quant.NF4_LEVELS, dtype=torch.float32)
    pairs = torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=1).contiguous()
    return pairs.view(torch.float64).reshape(-1).to(device)


def dequantize(data: torch.Tensor, numel: int, fmt: str, out: torch.Tensor, scratch=None) -> None:
    """Write the `numel` weights held in `data` (uint8, on the compute device) into `out`
    (flat, the compute dtype), CHUNK elements at a time (each chunk's codes, values and
    scales stay in the cache between its passes), on `data`'s device. `scratch`: a dict of
    reusable buffers (kept by the caller across calls: fresh memory costs page faults).

    int8: the codes converted, then scaled in place ([groups, 64] times [groups, 1]); NF4: one
    gather of two values per byte (nf4_pair_table), then the same scaling. (One mixed-dtype
    multiplication would be one pass fewer, but on a CPU it converts its int8 operand into a
    new temporary: measured, a page fault per 4 KiB of it.)"""
    scratch = {} if scratch is None else scratch
    codes = quant.code_bytes(numel, fmt)
    scales = data[codes:codes + quant.scale_bytes(numel)].view(quant.SCALE_DTYPE)
    step = CHUNK if out.device.type == "cpu" else GPU_CHUNK
    for start in range(0, numel, step):
        count = min(step, numel - start)
        target = out[start:start + count]
        work = target if target.dtype == torch.float32 else _buffer(scratch, "fp32", count, torch.float32, out.device)
        group_scales = _buffer(scratch, "scales", count // quant.GROUP, torch.float32, out.device)
        group_scales.copy_(scales[start // quant.GROUP:(start + count) // quant.GROUP])
        if fmt == "int8":
            work.copy_(data[start:start + count].view(torch.int8))  # (a mixed-dtype op would allocate)
        else:
            table = scratch.get("nf4") if scratch.get("nf4") is not None else nf4_pair_table(out.device)
            scratch["nf4"] = table
            index = _buffer(scratch, "index", count // 2, torch.int32, out.device)
            index.copy_(data[start // 2:(start + count) // 2])  # (index_select takes int32 or int64 indices)
            torch.index_select(table, 0, index, out=work.view(torch.float64))
        work.view(-1, quant.GROUP).mul_(group_scales.view(-1, 1))
        if work is not target:
            target.copy_(work)


def _buffer(scratch: dict, key: str, count: int, dtype: torch.dtype, device) -> torch.Tensor:
    held = scratch.get(key)
    if held is None or held.numel() < count or held.device != torch.device(device):
        held = scratch[key] = torch.empty(count, dtype=dtype, device=device)
    return held[:count]


def dequantized(value: torch.Tensor, fmt: str, compute_dtype: torch.dtype) -> torch.Tensor:
    """What the engine computes with for a parameter loaded compressed (same shape, compute
    dtype): quantize then dequantize. Used to check results, and by tests as the reference."""
    data = quantize(value, fmt, compute_dtype)
    if not quant.is_quantized(value.shape):
        return data.view(compute_dtype).reshape(value.shape).clone()
    out = torch.empty(value.numel(), dtype=compute_dtype)
    dequantize(data, value.numel(), fmt, out)
    return out.view(value.shape)
