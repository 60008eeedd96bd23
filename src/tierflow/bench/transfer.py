"""`tierflow bench transfer`: host<->device copies through tierflow's pinned staging pool.

Needs a CUDA device. Three comparisons, each measured in one run with the contenders
interleaved (medians of `repeats`):

* `h2d` / `d2h`: `nbytes` copied chunk by chunk between the buffers of a pinned
  `tierflow.memory.pool.BufferPool` and the device, on the engine's side stream
  (`ComputeDevice.lane("copy")`), waiting for a buffer's previous copy before reusing
  it, as the engine does; against one plain `copy_` of a single large pinned tensor.
  Target: the pool reaches >= 85% of the plain copy's bandwidth.
* `matmul`: a matmul loop on the compute stream, alone and while a background thread
  streams the pool's copies (both directions) on the side stream. Target: compute
  keeps its speed (ratio close to 1).
"""
from __future__ import annotations

import math
import statistics
import threading
import time

import torch

from tierflow.bench.report import print_row, row, write_json

__all__ = ["run_transfer_bench"]

G = 1e9
MATMUL_SIZE = 8192
MATMUL_SECONDS = 0.5  # length of one timed matmul loop


def run_transfer_bench(nbytes: int = 1 << 30, json_path=None, chunk_bytes: int = 8 << 20,
                       buffers: int = 8, repeats: int = 5) -> list[dict]:
    """Measure and print the pool's transfer bandwidth and its effect on compute; returns
    the rows ([] without a CUDA device)."""
    if not torch.cuda.is_available():
        print("tierflow bench transfer: no CUDA device: skipped")
        write_json([], json_path)
        return []
    from tierflow.memory.device import ComputeDevice
    from tierflow.memory.pool import BufferPool

    device = ComputeDevice(torch.device("cuda"))
    pool = BufferPool(buffers, chunk_bytes, pin=True)
    print(f"{nbytes / 2**30:.2f} GiB each way on {torch.cuda.get_device_name()}; pool of {buffers} x "
          f"{chunk_bytes / 2**20:g} MiB buffers, pinned: {pool.pinned}; median of {repeats}", flush=True)
    gpu = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    contenders = {
        "pool-h2d": lambda: _pool_copy(device, pool, gpu, to_device=True),
        "plain-h2d": lambda: _plain_copy(gpu, host),
        "pool-d2h": lambda: _pool_copy(device, pool, gpu, to_device=False),
        "plain-d2h": lambda: _plain_copy(host, gpu),
    }
    gbps = {name: nbytes / seconds / G for name, seconds in _interleaved(contenders, repeats).items()}
    alone, with_copies = _matmul_overlap(device, pool, gpu, repeats)

    rows = [
        row("h2d pinned pool vs pinned copy_", gbps["pool-h2d"], gbps["plain-h2d"], "GB/s"),
        row("d2h pinned pool vs pinned copy_", gbps["pool-d2h"], gbps["plain-d2h"], "GB/s"),
        row("matmul with pool copies vs alone", with_copies, alone, "TFLOP/s"),
    ]
    for r in rows:
        print_row(r)
    write_json(rows, json_path)
    return rows


# ---- copies -------------------------------------------------------------------------------

def _pool_copy(device, pool, gpu: torch.Tensor, to_device: bool) -> None:
    """Copy all of `gpu` to (or from) the device chunk by chunk through the pool's buffers,
    on the side stream; a buffer is reused only once its previous copy has completed."""
    chunk = pool.nbytes
    bufs = [pool.acquire() for _ in range(pool.count)]
    events = [None] * len(bufs)
    try:
        with device.lane("copy"):
            for i, start in enumerate(range(0, gpu.numel(), chunk)):
                slot = i % len(bufs)
                device.synchronize_event(events[slot])  # the engine refills a buffer only now
                count = min(chunk, gpu.numel() - start)
                if to_device:
                    gpu[start:start + count].copy_(bufs[slot][:count], non_blocking=True)
                else:
                    bufs[slot][:count].copy_(gpu[start:start + count], non_blocking=True)
                events[slot] = device.record_event()
        for event in events:
            device.synchronize_event(event)
    finally:
        for buf in bufs:
            pool.release(buf)


def _plain_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """One large copy between a pinned host tensor and the device, on the current stream."""
    dst.copy_(src, non_blocking=True)
    torch.cuda.current_stream().synchronize()


def _interleaved(contenders: dict, repeats: int) -> dict[str, float]:
    """Median wall seconds of each contender; one warm-up call each, order rotating per repeat."""
    names = list(contenders)
    for name in names:
        contenders[name]()
    samples = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            torch.cuda.synchronize()
            start = time.perf_counter()
            contenders[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


# ---- compute overlap ----------------------------------------------------------------------

def _matmul_overlap(device, pool, gpu: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median TFLOP/s of a bf16 matmul loop on the compute stream, (alone, while a thread
    streams pool copies both ways on the side stream), alternating the two."""
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    out = torch.empty_like(a)
    iters = _calibrate(a, b, out)
    flops = 2 * MATMUL_SIZE ** 3 * iters
    alone, overlapped = [], []
    for _ in range(repeats):
        alone.append(flops / _matmul_loop(a, b, out, iters) / 1e12)
        overlapped.append(flops / _with_copies(device, pool, gpu, lambda: _matmul_loop(a, b, out, iters)) / 1e12)
    return statistics.median(alone), statistics.median(overlapped)


def _matmul_loop(a, b, out, iters: int) -> float:
    """Wall seconds of `iters` matmuls on the compute (current) stream."""
    stream = torch.cuda.current_stream()
    stream.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        torch.mm(a, b, out=out)
    stream.synchronize()
    return time.perf_counter() - start


def _calibrate(a, b, out) -> int:
    """Matmuls in a loop of about MATMUL_SECONDS."""
    _matmul_loop(a, b, out, 3)  # warm-up (cuBLAS handles, clocks)
    seconds = _matmul_loop(a, b, out, 10) / 10
    return max(10, math.ceil(MATMUL_SECONDS / seconds))


def _with_copies(device, pool, gpu, compute) -> float:
    """Run `compute()` (returns its seconds) while a thread copies through the pool both
    ways, without pause, until it is done."""
    stop = threading.Event()
    errors = []

    def stream_copies():
        try:
            while not stop.is_set():
                _pool_copy(device, pool, gpu, to_device=True)
                _pool_copy(device, pool, gpu, to_device=False)
        except BaseException as exc:  # report it on the main thread
            errors.append(exc)

    thread = threading.Thread(target=stream_copies, name="tierflow-bench-copies", daemon=True)
    thread.start()
    try:
        time.sleep(0.05)  # let the copies start
        return compute()
    finally:
        stop.set()
        thread.join()
        if errors:
            raise errors[0]
