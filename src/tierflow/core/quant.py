"""Compressed frozen weights: the group-wise int8 and 4-bit (NF4) formats and their byte layout.

A frozen unit (no trainable parameter: inference, or the frozen base under LoRA) may keep
its weights compressed in its home tier; they are dequantized on the compute device just
before use (memory/packed.py). Each parameter of two or more dimensions is cut into groups
of `GROUP` consecutive elements (of the flattened tensor), each group with one fp16 scale:

    int8   symmetric absmax: code = round(w / s), s = absmax / 127; w ~ code * s
           (1 + 2/64 bytes per weight: 3.88x fewer than fp32)
    int4   NF4 as in QLoRA (Dettmers et al. 2023): w / absmax rounded to the nearest of
           16 normal-float levels, two codes per byte; w ~ NF4[code] * absmax
           (0.5 + 2/64 bytes per weight: 7.53x fewer than fp32)

One-dimensional parameters (norms, biases) are few bytes and sensitive: they stay in the
compute dtype, as bitsandbytes and QLoRA leave them. A unit's compressed state is one byte
array: per parameter, its codes then its scales (or its raw compute-dtype bytes), each
parameter starting on a 4096-byte boundary so NVMe reads and writes stay O_DIRECT-aligned.

Why not a library (evaluated 2026-11 with torch 2.13.0+cpu): bitsandbytes 0.50.2 quantizes
NF4 and 8-bit blockwise on CPU and CUDA, but it is 125 MB installed (one binary per CUDA
and ROCm version), is not on the GPU machine and cannot travel to it (64 MiB), its 8-bit
format is a dynamic-tree code book rather than linear int8, and its quantization state is
a nested object rather than bytes one can place in a tier. torchao 0.18's compiled
extensions are built for another Python/torch (they fail to load here) and its NF4 tensor
is no longer where its docs say (`torchao.dtypes.nf4tensor`); its int8 is a tensor
subclass replacing module weights, not a storable format. The arithmetic here is a few
torch ops, runs wherever torch runs (CPU and GPU alike), and the NF4 levels are QLoRA's
(identical to bitsandbytes' `get_4bit_type("nf4")`).

This module is pure: formats, sizes and layout. The arithmetic that quantizes and dequantizes
tensors lives with the storage, in memory/packed.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tierflow.errors import ConfigError

GROUP = 64             # elements per scale (QLoRA's block size)
SLOT_ALIGN = 4096      # bytes: every parameter's bytes start O_DIRECT-aligned
SCALE_DTYPE = torch.float16
FP16_MAX = 65504.0

# QLoRA's NormalFloat4 levels (bitsandbytes functional.get_4bit_type("nf4")).
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


def is_quantized(shape) -> bool:
    """Parameters of two or more dimensions are compressed; vectors stay in the compute dtype."""
    return len(shape) >= 2


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def code_bytes(numel: int, fmt: str) -> int:
    return numel if fmt == "int8" else numel // 2


def scale_bytes(numel: int) -> int:
    return numel // GROUP * SCALE_DTYPE.itemsize


def slot_bytes(numel: int, shape, fmt: str, compute_dtype: torch.dtype) -> int:
    """Bytes of one parameter in its unit's compressed array (before alignment)."""
    if not is_quantized(shape):
        return numel * compute_dtype.itemsize
    return code_bytes(numel, fmt) + scale_bytes(numel)


@dataclass(frozen=True)
class SlotBytes:
    """Where one parameter lives in its unit's compressed array."""

    offset: int            # byte offset (SLOT_ALIGN-aligned)
    nbytes: int
    quantized: bool


def layout(unit, compute_dtype: torch.dtype) -> list[SlotBytes]:
    """Byte placement of every slot of a compressed unit, in slot order."""
    out, offset = [], 0
    for slot in unit.slots:
        nbytes = slot_bytes(slot.numel, slot.shape, unit.weights, compute_dtype)
        out.append(SlotBytes(offset, nbytes, is_quantized(slot.shape)))
        offset += _round_up(nbytes, SLOT_ALIGN)
    return out


def packed_nbytes(unit, compute_dtype: torch.dtype) -> int:
    """Bytes of a compressed unit's whole array."""
    return sum(_round_up(s.nbytes, SLOT_ALIGN) for s in layout(unit, compute_dtype))


def check_groupable(name: str, shape, numel: int, fmt: str) -> None:
    """A compressed parameter must split into whole groups."""
    if is_quantized(shape) and numel % GROUP:
        raise ConfigError(f"weights={fmt!r}: parameter {name} of shape {list(shape)} has {numel} elements, "
                          f"not a multiple of the group size {GROUP}: it cannot be grouped (pass weights=None)")
