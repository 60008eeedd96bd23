"""Compressed frozen weights in their tier: written quantized, read back dequantized on the device.

A compressed unit (core/quant.py) keeps one byte array, 'qweights', in its home tier (device,
host or an NVMe extent, through `StateIO` like any array). Loading quantizes one parameter at
a time as it streams in (`write_slot`), so no more than one parameter is ever held
uncompressed. A fetch (`fetch_into`) brings the unit's compressed bytes to the compute
device, where they are dequantized into the unit's flat buffer: the bytes that cross the
disk and the host-device link are the compressed ones, and the arithmetic runs where the
compute happens (the GPU when there is one, on the copy lane the fetch runs on).
"""
from __future__ import annotations

import torch

from tierflow.core import quant
from tierflow.errors import ConfigError
from tierflow.memory.tiers import StateIO, UnitState

ARRAY = "qweights"


def write_slot(io: StateIO, state: UnitState, unit, index: int, value: torch.Tensor,
               compute_dtype: torch.dtype) -> None:
    """Quantize parameter `index` of `unit` (its full value, any device) into the unit's array."""
    slot = unit.slots[index]
    where = quant.layout(unit, compute_dtype)[index]
    data = quant.quantize(value.detach().cpu(), unit.weights, compute_dtype, name=slot.name)
    io.write_from(state, ARRAY, data, where.offset)


class PackedWeights:
    """Fetches of compressed units: their bytes to the device, dequantized there. Used by the
    transfer thread only (one fetch at a time), so its reusable buffers need no lock; on a GPU
    every use is ordered on the copy lane, so a buffer is refilled only after the kernels
    reading it."""

    def __init__(self, io: StateIO, compute_dtype: torch.dtype):
        self.io, self.compute_dtype = io, compute_dtype
        self.buffer = None   # compressed bytes on the device, grown to the largest unit
        self.scratch = {}    # dequantization scratch (quant.dequantize)
        self.layouts = {}    # unit id -> quant.layout

    def fetch_into(self, state: UnitState, unit, flat: torch.Tensor) -> int:
        """Dequantize the unit's weights into `flat` (its device buffer, compute dtype) on the
        device; returns the bytes moved to get them there."""
        data, moved = self._on_device(state, flat.device)
        for slot, where in zip(unit.slots, self._layout(unit)):
            piece = data[where.offset:where.offset + where.nbytes]
            target = flat[slot.offset:slot.offset + slot.numel]
            if where.quantized:
                quant.dequantize(piece, slot.numel, unit.weights, target, self.scratch)
            else:
                target.copy_(piece.view(self.compute_dtype))
        return moved

    def read_slot(self, state: UnitState, unit, index: int) -> torch.Tensor:
        """Parameter `index` dequantized, as a new fp32 CPU tensor of its shape."""
        slot, where = unit.slots[index], self._layout(unit)[index]
        data = torch.empty(where.nbytes, dtype=torch.uint8)
        self._read(state, data, where.offset)
        if not where.quantized:
            return data.view(self.compute_dtype).to(torch.float32).view(slot.shape)
        out = torch.empty(slot.numel, dtype=self.compute_dtype)
        quant.dequantize(data, slot.numel, unit.weights, out)
        return out.to(torch.float32).view(slot.shape)

    def _layout(self, unit) -> list:
        if unit.uid not in self.layouts:
            self.layouts[unit.uid] = quant.layout(unit, self.compute_dtype)
        return self.layouts[unit.uid]

    def _on_device(self, state: UnitState, device: torch.device) -> tuple[torch.Tensor, int]:
        """The unit's compressed bytes on `device`: the array itself when it already lives
        there (device home; host home with a CPU device), else read into the reused buffer."""
        array = state.arrays[ARRAY]
        if isinstance(array, torch.Tensor) and array.device == device:
            return array, array.numel()
        nbytes = state.nbytes(ARRAY)  # (whole slots of 4 KiB: as an NVMe extent holds them)
        if self.buffer is None or self.buffer.numel() < nbytes or self.buffer.device != device:
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.io.read_into(state, ARRAY, self.buffer[:nbytes])
        return self.buffer[:nbytes], nbytes

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
