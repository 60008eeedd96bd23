"""The machine figures the cost model plans with: what they are, their cache, nominal values.

They are measured by `tierflow bench calibrate` (tierflow/bench/calibrate.py):

* compute: FLOP/s of a large square matmul, and of the forward and backward of a small
  reference Llama (2 layers) at a few widths, in the compute dtype on the device, with
  threads like the engine's alive beside it (on a CPU they slow compute down);
* memory: plain memcpy bandwidth, and host->device / device->host copies (CUDA: from
  pinned memory; CPU: a copy into a newly allocated buffer, which is what a fetch does);
* NVMe: read and write bandwidth of tierflow's NvmeStore (O_DIRECT where possible) with
  the engine's request pattern (four 8 MiB arrays per window);
* optimizer: CPU AdamW parameters/s with `tierflow.runtime.updates.adamw_` (and on the device);
* contention (CPU device): the share of speed compute and AdamW each lose while they run
  together on the same cores.

Results are cached per machine as JSON in ``$XDG_CACHE_HOME/tierflow/calibration-<host>.json``
(default ``~/.cache``), one entry per device type and dtype, reused unless recalibrating.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

CACHE_VERSION = 9


@dataclass(frozen=True)
class Calibration:
    """Measured figures of one machine, device and compute dtype (rates per second).

    `block_flops` holds (width, forward FLOP/s, backward FLOP/s, forward s, backward s) of
    a reference model at a few widths: the rate of a decoder layer and the time per step
    that does not grow with depth; `contention` the fractions of speed that compute, CPU
    work (AdamW, copies; CPU device: they share the cores) and NVMe I/O lose while compute
    runs beside them.
    """

    device: str
    dtype: str
    matmul_flops: float
    block_flops: tuple
    memcpy_bps: float
    drain_bps: float
    h2d_bps: float
    d2h_bps: float
    nvme_read_bps: float
    nvme_write_bps: float
    adamw_params_per_s: float
    device_adamw_params_per_s: float
    contention: tuple
    unit_overhead_s: tuple  # engine bookkeeping per unit and step: (device-resident, streamed)
    cores: int
    host: str = ""
    created: float = 0.0
    others_load: float = 0.0  # cores other processes used while it was measured (noise)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["block_flops"] = tuple(tuple(row) for row in values.get("block_flops", ()))
        values["contention"] = tuple(values.get("contention", (0.5, 0.5, 0.0)))
        values["unit_overhead_s"] = tuple(values.get("unit_overhead_s", (0.0, 0.0)))
        return cls(**values)

    def block_rate(self, width: int) -> tuple[float, float]:
        """(forward, backward) FLOP/s of a decoder layer at a model width, interpolated."""
        return self._interpolate(width, 1, 2, (self.matmul_flops, self.matmul_flops))

    def block_fixed(self, width: int) -> tuple[float, float]:
        """(forward, backward) seconds per step that do not grow with depth, interpolated."""
        return self._interpolate(width, 3, 4, (0.0, 0.0))

    def _interpolate(self, width: int, i: int, j: int, default: tuple) -> tuple[float, float]:
        rows = sorted(row + (0.0, 0.0)[len(row) - 3:] if len(row) == 3 else row for row in self.block_flops)
        if not rows:
            return default
        if width <= rows[0][0]:
            return rows[0][i], rows[0][j]
        for low, high in zip(rows, rows[1:]):
            if width <= high[0]:
                a = (width - low[0]) / (high[0] - low[0])
                return low[i] + a * (high[i] - low[i]), low[j] + a * (high[j] - low[j])
        return rows[-1][i], rows[-1][j]


# ---- cache ------------------------------------------------------------------------------

def cache_path() -> Path:
    """Where this machine's calibration is cached."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "tierflow" / f"calibration-{socket.gethostname()}.json"


def _key(device: str, dtype: torch.dtype) -> str:
    return f"{torch.device(device).type}/{str(dtype).removeprefix('torch.')}"


def load_cached(device: str, dtype: torch.dtype, path: Path | None = None) -> Calibration | None:
    """The cached calibration for this device type and dtype, or None."""
    path = path or cache_path()
    try:
        data = json.loads(path.read_text())
        if data.get("version") != CACHE_VERSION:
            return None
        return Calibration.from_dict(data["entries"][_key(device, dtype)])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save(cal: Calibration, dtype: torch.dtype, path: Path | None = None) -> Path:
    """Add `cal` to the cache file (other entries stay); returns the path."""
    path = path or cache_path()
    try:
        data = json.loads(path.read_text())
        if data.get("version") != CACHE_VERSION:
            data = {}
    except (OSError, ValueError):
        data = {}
    entries = data.get("entries", {})
    entries[_key(cal.device, dtype)] = cal.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=2) + "\n")
    tmp.replace(path)
    return path


def nominal(device: str = "cpu", dtype: torch.dtype = torch.float32) -> Calibration:
    """Typical figures to plan with before this machine has been calibrated: a small CPU
    server (those of the 2-core machine tierflow's CPU benchmarks ran on, rounded) or a
    PCIe 5 GPU server (the 16-core H200 host of docs/benchmarks.md, "GPU training
    throughput", rounded: 55 GB/s pinned copies each way, ~28 GB/s host copies, 2.5 G
    params/s fused CPU AdamW, ~330 TFLOP/s bf16 blocks: torch's own step at batch 16x1024
    ran at 333). Only the planner's choices rest
    on them; `tierflow bench calibrate` replaces them with measured ones."""
    g = 1e9
    common = dict(dtype=str(dtype).removeprefix("torch."), nvme_read_bps=1.5 * g, nvme_write_bps=1.5 * g,
                  cores=torch.get_num_threads(), host="nominal")
    if torch.device(device).type == "cuda":
        rate = 330e12 if dtype != torch.float32 else 50e12
        return Calibration(device="cuda", matmul_flops=2 * rate, block_flops=((2048, rate, rate, 0.002, 0.004),),
                           memcpy_bps=28 * g, drain_bps=25 * g, h2d_bps=55 * g, d2h_bps=55 * g,
                           adamw_params_per_s=2.5 * g, device_adamw_params_per_s=20 * g, contention=(0.0, 0.0, 0.0),
                           unit_overhead_s=(0.3e-3, 0.5e-3), **common)
    return Calibration(device="cpu", memcpy_bps=10 * g, drain_bps=5 * g,
                       matmul_flops=100 * g, block_flops=((512, 60 * g, 60 * g, 0.0, 0.0),),
                       h2d_bps=10 * g, d2h_bps=10 * g, adamw_params_per_s=0.7 * g,
                       device_adamw_params_per_s=0.7 * g, contention=(0.15, 0.8, 0.15),
                       unit_overhead_s=(1.5e-3, 1.7e-3), **common)


def for_planning(device: str = "cpu", dtype: torch.dtype = torch.float32) -> Calibration:
    """This machine's cached calibration, else `nominal` figures (never measures: the
    engine must not spend 20 s calibrating when it is created)."""
    return load_cached(device, dtype) or nominal(device, dtype)


# ---- report -----------------------------------------------------------------------------

def describe(cal: Calibration) -> list[str]:
    """Human-readable lines, one figure each."""
    g = 1e9
    lines = [f"device {cal.device}, dtype {cal.dtype}, {cal.cores} compute threads, host {cal.host}; "
             f"other processes used {cal.others_load:.2f} cores meanwhile",
             f"matmul                {cal.matmul_flops / g:8.1f} GFLOP/s"]
    for width, fwd, bwd, *fixed in cal.block_flops:
        fixed = fixed or (0.0, 0.0)
        lines.append(f"layer width {width:<5}     {fwd / g:8.1f} GFLOP/s forward, {bwd / g:.1f} backward; "
                     f"+{fixed[0] * 1e3:.0f}/{fixed[1] * 1e3:.0f} ms per step")
    lines += [f"memcpy                {cal.memcpy_bps / g:8.2f} GB/s",
              f"gradient drain        {cal.drain_bps / g:8.2f} GB/s (norm + copy)",
              f"host->device          {cal.h2d_bps / g:8.2f} GB/s" + (" (memcpy into a reused buffer)" if cal.device == "cpu" else ""),
              f"device->host          {cal.d2h_bps / g:8.2f} GB/s",
              f"NVMe read / write     {cal.nvme_read_bps / g:8.2f} / {cal.nvme_write_bps / g:.2f} GB/s",
              f"AdamW (CPU)           {cal.adamw_params_per_s / g:8.3f} G params/s",
              f"AdamW (device)        {cal.device_adamw_params_per_s / g:8.3f} G params/s",
              f"contention            {cal.contention[0]:8.2f} of compute speed, {cal.contention[1]:.2f} of CPU "
              f"work's and {cal.contention[2]:.2f} of NVMe I/O speed lost while they run together",
              f"engine bookkeeping    {cal.unit_overhead_s[0] * 1e3:8.2f} ms per device-resident unit and step, "
              f"{cal.unit_overhead_s[1] * 1e3:.2f} ms per streamed unit"]
    return lines
