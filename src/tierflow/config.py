"""Configuration: one frozen dataclass for every engine knob, validated once.

The Python API (`tierflow.offload`) and the CLI both build an `OffloadConfig`,
so validation and error messages live here and nowhere else.
"""
from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tierflow.errors import ConfigError

MODES = ("keep", "recompute", "offload", "auto", "autograd")  # activation modes (activations.py)
WEIGHT_FORMATS = ("int8", "int4")  # compressed frozen weights (core/quant.py)


def check_mode(mode) -> str | None:
    """Validate an `activations=` value (None: the default, see `default_activations`)."""
    if mode is None:
        return None
    if not isinstance(mode, str) or mode.lower() not in MODES:
        raise ConfigError(f"unknown activations mode {mode!r}: use one of {', '.join(MODES)}")
    return mode.lower()


def default_activations(mode: str | None, device: torch.device, device_memory: int | None) -> str | None:
    """The activation mode the engine runs with (None: left to autograd, not accounted).

    Unset (None), it is "auto" on a GPU given a `device_memory` budget, so that the budget
    bounds the engine's whole use of the GPU, activations included; elsewhere autograd keeps
    them as usual. "autograd" asks for that explicitly."""
    if mode is None:
        return "auto" if device.type == "cuda" and device_memory is not None else None
    return None if mode == "autograd" else mode

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
MIN_STAGING_BUFFERS = 5
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str | None, *, what: str = "size") -> int | None:
    """Parse "1GiB", "512MiB", "2.5GB", "1e9"-free plain ints, or None.

    Binary suffixes (KiB, MiB, GiB, TiB) are powers of 1024, decimal ones (KB, MB, GB)
    powers of 1000. A bare number is bytes.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size like '2GiB', got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):  # int() of them raises a bare ValueError / OverflowError
            raise ConfigError(f"{what}: size must be a finite number of bytes, got {value!r}")
        if value < 0:
            raise ConfigError(f"{what}: size must not be negative, got {value!r}")
        return int(value)
    match = _SIZE_RE.match(str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(
            f"{what}: cannot parse size {value!r}; write a number with a unit, "
            f"e.g. '512MiB', '2GiB' or '1.5GB' (units: KiB MiB GiB TiB KB MB GB TB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(nbytes: int | float) -> str:
    """Human-readable binary size, e.g. 1536 -> '1.5 KiB'."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def parse_device(device: str | torch.device) -> torch.device:
    """Validate the compute device: 'cpu' or 'cuda[:N]' (which must be available)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r}: use 'cpu' or 'cuda' ({exc})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {device!r}: tierflow computes on 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available: use device='cpu'")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Compute dtype: None (the model's own), or float32 / bfloat16 / float16."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in _DTYPES.values():
            raise ConfigError(f"unsupported compute dtype {dtype}: use float32, bfloat16 or float16")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(f"unsupported compute dtype {dtype!r}: use float32, bfloat16 or float16")
    return _DTYPES[key]


@dataclass(frozen=True)
class OffloadConfig:
    """Everything the engine needs to know; build with `OffloadConfig.create`.

    Attributes:
        device: compute device ('cpu' or 'cuda:N').
        device_memory: bytes the engine may hold on the compute device (weights in use,
            prefetched weights, gradients in flight, device-resident state). None = no limit
            beyond what the device has.
        host_memory: bytes the engine may hold in host RAM (host-resident state and the
            staging buffers of the NVMe tier). None = no limit.
        nvme: directory for the NVMe tier's spill file, or None (no NVMe tier).
        dtype: compute dtype of the weights fetched to the device; None = model's own.
        unit_bytes: target size of a fetch unit (a module subtree whose parameters move
            together); None = derived from the device budget.
        prefetch_bytes: how many bytes of upcoming units may be in flight; None = derived.
        chunk_bytes: size of one NVMe request / staging buffer.
        staging_buffers: number of staging buffers in the host pool (NVMe <-> compute).
        io_threads: threads issuing NVMe requests (4: reads and write-backs of the optimizer
            overlap; measured ~20% faster updates than 2 on a 2-core machine).
        direct_io: use O_DIRECT (None = when the file system supports it).
        update_on: where AdamW runs for state homed in host memory or on NVMe: "cpu";
            "device" (on the GPU: the state is copied there, updated and copied back, 16 B
            in and 12 B out per parameter over PCIe); "auto" (per unit, where the planner
            predicts it faster, planner.update_sites). A GPU-side update needs free device
            room for 8 scratch buffers (two sets of four) at that moment, else it runs on the CPU. On a CPU
            device all three are the same.
        activations: what happens to the tensors autograd saves for backward (see
            activations.py): None = left to autograd (not accounted); "keep" = kept on the
            device and accounted; "recompute" = each layer checkpointed; "offload" = copied
            to host memory (NVMe when the host budget is short) and back ahead of backward;
            "auto" = chosen per layer from the budgets and the first step's measurements.
            `create` resolves the user's value: unset means "auto" on a GPU with a
            device_memory budget (the budget then bounds all of the engine's GPU memory),
            else None; "autograd" means None.
        batch_shape: (batch size, sequence length) of one micro-batch, as the planner assumes
            it when it weighs compute against transfers to choose the placement (planner.py);
            it changes where state lives, never what is computed. None = (1, 256).
        weights: None, or "int8" / "int4" (NF4): frozen units (no trainable parameter) keep
            their weights compressed group-wise in their home tier and are dequantized on
            the device just before use (core/quant.py). Trainable parameters stay as they are.
        host_in_place: CPU compute device only: host-homed units are computed where they live,
            with no copy into a device buffer (host memory is the compute device's memory
            there), and they take none of the device budget. `create` resolves None to True on
            a CPU; False streams them through device buffers as on a GPU (the tests use it to
            run the GPU's fetch path on a CPU).
    """

    device: torch.device
    device_memory: int | None = None
    host_memory: int | None = None
    nvme: Path | None = None
    dtype: torch.dtype | None = None
    unit_bytes: int | None = None
    prefetch_bytes: int | None = None
    chunk_bytes: int = 8 * 2**20
    staging_buffers: int = 8
    io_threads: int = 4
    direct_io: bool | None = None
    update_on: str = "auto"
    activations: str | None = None
    batch_shape: tuple[int, int] | None = None
    weights: str | None = None
    host_in_place: bool = False

    def device_capacity(self) -> int | None:
        """The device budget: device_memory, or on CUDA without one, 80% of what is free now
        (the rest left for activations and the allocator's slack)."""
        if self.device_memory is not None or self.device.type == "cpu":
            return self.device_memory
        free, _total = torch.cuda.mem_get_info(self.device)
        return int(free * 0.8)

    @classmethod
    def create(cls, device="cpu", device_memory=None, host_memory=None, nvme=None, dtype=None,
               unit_bytes=None, prefetch_bytes=None, chunk_bytes=None, staging_buffers=8,
               io_threads=4, direct_io=None, update_on="auto", activations=None,
               batch_shape=None, weights=None, host_in_place=None) -> "OffloadConfig":
        """Parse and validate user-facing values (sizes as strings or ints).

        `chunk_bytes` defaults to 8 MiB, less when the host budget is small: the staging
        buffers (staging_buffers + 2 of them) take at most a quarter of host_memory.
        """
        host = parse_size(host_memory, what="host_memory")
        if chunk_bytes is None:
            chunk = 8 * 2**20
            if host is not None:
                buffers = _whole_number(staging_buffers, "staging_buffers")
                chunk = min(chunk, max(64 * 2**10, host // (4 * (buffers + 2)) // 65536 * 65536))
        else:
            chunk = parse_size(chunk_bytes, what="chunk_bytes")
        if chunk <= 0 or chunk % 4096:
            raise ConfigError(f"chunk_bytes must be a positive multiple of 4096, got {chunk}")
        staging_buffers = _whole_number(staging_buffers, "staging_buffers")
        io_threads = _whole_number(io_threads, "io_threads")
        if staging_buffers < MIN_STAGING_BUFFERS:
            raise ConfigError(f"staging_buffers must be at least {MIN_STAGING_BUFFERS}: an AdamW update "
                              f"of NVMe-resident state holds master, gradient, both moments and the "
                              f"compute-dtype weights at once")
        if io_threads < 1:
            raise ConfigError("io_threads must be at least 1")
        if update_on not in ("auto", "cpu", "device"):
            raise ConfigError(f"update_on must be 'auto', 'cpu' or 'device', got {update_on!r}")
        if batch_shape is not None:
            try:
                batch_shape = tuple(int(x) for x in batch_shape)
            except (TypeError, ValueError):
                batch_shape = ()
            if len(batch_shape) != 2 or min(batch_shape) < 1:
                raise ConfigError("batch_shape must be (batch size, sequence length), two positive integers")
        if weights is not None and (not isinstance(weights, str) or weights.lower() not in WEIGHT_FORMATS):
            raise ConfigError(f"unknown weights format {weights!r}: use one of {', '.join(WEIGHT_FORMATS)} "
                              f"(or None for uncompressed weights)")
        if direct_io is not None and not isinstance(direct_io, bool):  # "false" would be truthy
            raise ConfigError(f"direct_io must be True, False or None (when the file system supports it), "
                              f"got {direct_io!r}")
        if nvme is not None and not str(nvme).strip():  # Path("") is the current directory
            raise ConfigError("nvme='' is not a directory: pass the NVMe spill directory, or None for no NVMe tier")
        unit_bytes = parse_size(unit_bytes, what="unit_bytes")
        if unit_bytes == 0:  # the engine would read 0 as "unset" and choose a size itself
            raise ConfigError("unit_bytes must be more than 0 bytes (leave it unset to have it chosen "
                              "from the budgets)")
        device, device_memory = parse_device(device), parse_size(device_memory, what="device_memory")
        if host_in_place and device.type != "cpu":
            raise ConfigError(f"host_in_place=True needs a CPU compute device: {device} cannot compute on "
                              f"host memory (leave it unset)")
        return cls(
            device=device,
            device_memory=device_memory,
            host_memory=host,
            nvme=Path(nvme).expanduser() if nvme is not None else None,
            dtype=parse_dtype(dtype),
            unit_bytes=unit_bytes,
            prefetch_bytes=parse_size(prefetch_bytes, what="prefetch_bytes"),
            chunk_bytes=chunk,
            staging_buffers=staging_buffers,
            io_threads=io_threads,
            direct_io=direct_io,
            update_on=update_on,
            activations=default_activations(check_mode(activations), device, device_memory),
            batch_shape=batch_shape,
            weights=weights.lower() if weights is not None else None,
            host_in_place=device.type == "cpu" if host_in_place is None else bool(host_in_place),
        )


def _whole_number(value, what: str) -> int:
    """A count (staging_buffers, io_threads): 5.9 must not silently become 5."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise ConfigError(f"{what} must be a whole number, got {value!r}")


def check_option_names(options, where: str = "tierflow.offload") -> None:
    """Refuse keyword options OffloadConfig does not have, naming the valid ones (Python's
    TypeError names only the bad one, and as an argument of OffloadConfig.create)."""
    known = [name for name in inspect.signature(OffloadConfig.create).parameters if name != "cls"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                          f"for {where}; valid options: {', '.join(known)}")

