"""`tierflow bench calibrate`: measure the machine figures the cost model needs (~10-30 s) and
cache them (what they are and where the cache lives: tierflow/core/figures.py)."""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import torch

from tierflow.bench import probes
from tierflow.core.figures import Calibration, cache_path, describe, load_cached, save
from tierflow.memory.device import return_freed_memory_to_os


def get_calibration(device: str = "cpu", dtype: torch.dtype = torch.float32, nvme_dir=None,
                    recalibrate: bool = False, path: Path | None = None, log=None) -> tuple[Calibration, bool]:
    """(calibration, whether it came from the cache); measures and caches when needed."""
    if not recalibrate:
        cached = load_cached(device, dtype, path)
        if cached is not None:
            return cached, True
    cal = calibrate(device, dtype, nvme_dir, log=log)
    save(cal, dtype, path)
    return cal, False


def calibrate(device: str = "cpu", dtype: torch.dtype = torch.float32, nvme_dir=None, log=None) -> Calibration:
    """Measure every figure of `Calibration` on this machine (~10-30 s)."""
    log = log or (lambda text: None)
    mark = probes.load_mark()
    return_freed_memory_to_os()  # allocate as the engine does (fresh pages for large tensors)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    log("compute ...")
    flops = probes.matmul_flops(dev, dtype)
    with probes.engine_threads():
        widths = (1024, 2048, 4096) if dev.type == "cuda" else (256, 512, 768, 1024)
        blocks = tuple(probes.block_flops(dev, dtype, w) for w in widths)
        log("memory ...")
        memcpy, drain = probes.memcpy_bps(), probes.drain_bps()
        h2d = d2h = memcpy  # a CPU fetch copies into a reused buffer of an evicted unit (runtime/spares.py)
        device_adamw = None
        if dev.type == "cuda":
            h2d, d2h = probes.link_bps(dev)
            device_adamw = probes.adamw_params_per_s(dev)
        log("NVMe ...")
        (nvme_read, nvme_write), io_lost = probes.nvme_bps(nvme_dir), probes.io_beside_compute(dev, nvme_dir)
        log("optimizer ...")
        adamw = probes.adamw_params_per_s()
        share = probes.contention() if dev.type == "cpu" else (0.0, 0.0)
    log("engine overhead ...")
    overhead = probes.unit_overhead(dev)
    return Calibration(
        device=dev.type, dtype=str(dtype).removeprefix("torch."), matmul_flops=flops, block_flops=blocks,
        memcpy_bps=memcpy, drain_bps=drain, h2d_bps=h2d, d2h_bps=d2h, nvme_read_bps=nvme_read,
        nvme_write_bps=nvme_write, adamw_params_per_s=adamw, device_adamw_params_per_s=device_adamw or adamw,
        contention=share + (io_lost,), unit_overhead_s=overhead, cores=torch.get_num_threads(),
        host=socket.gethostname(), created=time.time(), others_load=probes.others_load(mark))


def run_calibrate_bench(device: str = "cpu", dtype: str | None = None, nvme_dir=None,
                        recalibrate: bool = False, json_path=None) -> Calibration:
    """`tierflow bench calibrate`: print (and cache) this machine's figures."""
    from tierflow.config import parse_device, parse_dtype

    dev = parse_device(device)
    torch_dtype = parse_dtype(dtype) or torch.float32
    start = time.perf_counter()
    cal, cached = get_calibration(str(dev), torch_dtype, nvme_dir, recalibrate,
                                  log=lambda text: print(f"calibrating {text}", flush=True))
    where = cache_path()
    print(f"calibration {'from cache' if cached else f'measured in {time.perf_counter() - start:.1f} s'}: {where}")
    for line in describe(cal):
        print("  " + line)
    if cal.others_load > 0.25:
        print(f"warning: other processes used {cal.others_load:.1f} cores during the calibration, so these "
              f"figures are low; run `tierflow bench calibrate --recalibrate` on an idle machine")
    if json_path:
        Path(json_path).write_text(json.dumps(cal.to_dict(), indent=2) + "\n")
    return cal
