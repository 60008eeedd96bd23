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

This module is pure: formats, sizes, layout and the (de)quantization arithmetic on tensors
it is handed; it allocates nothing but its results and touches no tier.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tierflow.errors import ConfigError

GROUP = 64             # elements per scale (QLoRA's block size)
SLOT_ALIGN = 4096      # bytes: every parameter's bytes start O_DIRECT-aligned
SCALE_DTYPE = torch.float16
FP16_MAX = 65504.0
CHUNK = 1 << 20        # elements dequantized at a time (bounded scratch, warm caches)

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


# ---- the arithmetic ----------------------------------------------------------------------------
def quantize(value: torch.Tensor, fmt: str, compute_dtype: torch.dtype, name: str = "tensor") -> torch.Tensor:
    """One parameter's bytes in the compressed array (uint8, `slot_bytes` long)."""
    flat = value.detach().reshape(-1)
    if not is_quantized(value.shape):
        return flat.to(compute_dtype).view(torch.uint8)
    groups = flat.to(torch.float32).view(-1, GROUP)
    absmax = groups.abs().amax(dim=1, keepdim=True)
    scale = absmax / 127 if fmt == "int8" else absmax
    if not torch.isfinite(scale).all() or scale.max() > FP16_MAX:
        raise ConfigError(f"weights={fmt!r}: {name} has values beyond what fp16 scales hold (|w| up to "
                          f"{absmax.max().item():.3g}): load it uncompressed")
    scale = scale.to(SCALE_DTYPE)
    divisor = torch.where(scale == 0, 1.0, scale.float())  # an all-zero group stays zero
    if fmt == "int8":
        codes = torch.round(groups / divisor).clamp_(-127, 127).to(torch.int8).view(torch.uint8).reshape(-1)
    else:
        levels = torch.tensor(NF4_LEVELS)
        nearest = torch.bucketize((groups / divisor).reshape(-1), (levels[1:] + levels[:-1]) / 2)
        nearest = nearest.to(torch.uint8)
        codes = (nearest[0::2] << 4) | nearest[1::2]
    return torch.cat([codes, scale.reshape(-1).view(torch.uint8)])


def nf4_pair_table(device) -> torch.Tensor:
    """Byte -> its two NF4 levels (high nibble first), as 256 float64 cells of two fp32 each:
    one index_select per byte dequantizes two weights (measured ~4x a per-nibble lookup on CPU)."""
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
    pairs = torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=1).contiguous()
    return pairs.view(torch.float64).reshape(-1).to(device)


def dequantize(data: torch.Tensor, numel: int, fmt: str, out: torch.Tensor, scratch=None) -> None:
    """Write the `numel` weights held in `data` (uint8, on the compute device) into `out`
    (flat, the compute dtype), CHUNK elements at a time, on `data`'s device. `scratch`: a
    dict of reusable buffers (kept by the caller across calls)."""
    scratch = {} if scratch is None else scratch
    codes = code_bytes(numel, fmt)
    scales = data[codes:codes + scale_bytes(numel)].view(SCALE_DTYPE)
    for start in range(0, numel, CHUNK):
        count = min(CHUNK, numel - start)
        target = out[start:start + count]
        work = target if target.dtype == torch.float32 else _buffer(scratch, "fp32", count, torch.float32, out.device)
        if fmt == "int8":
            work.copy_(data[start:start + count].view(torch.int8))
        else:
            table = scratch.get("nf4") if scratch.get("nf4") is not None else nf4_pair_table(out.device)
            scratch["nf4"] = table
            index = _buffer(scratch, "index", count // 2, torch.int32, out.device)
            index.copy_(data[start // 2:(start + count) // 2])  # into a kept buffer: no page faults
            torch.index_select(table, 0, index, out=work.view(torch.float64))
        group_scales = _buffer(scratch, "scales", count // GROUP, torch.float32, out.device)
        group_scales.copy_(scales[start // GROUP:(start + count) // GROUP])
        work.view(-1, GROUP).mul_(group_scales.view(-1, 1))
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
    if not is_quantized(value.shape):
        return data.view(compute_dtype).reshape(value.shape).clone()
    out = torch.empty(value.numel(), dtype=compute_dtype)
    dequantize(data, value.numel(), fmt, out)
    return out.view(value.shape)
