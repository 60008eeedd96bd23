"""`tierflow bench calibrate`: measure the machine figures the cost model needs (~10-30 s).

* compute: FLOP/s of a large square matmul, and of the forward and backward of a
  reference Llama-style block (RMSNorm, causal attention, gated MLP) at a few widths,
  in the compute dtype on the device;
* memory: plain memcpy bandwidth, and host->device / device->host copies (CUDA: from
  pinned memory; CPU: a copy into a newly allocated buffer, which is what a fetch does);
* NVMe: read and write bandwidth of tierflow's NvmeStore (O_DIRECT where possible) with
  the engine's request pattern (four 8 MiB arrays per window);
* optimizer: CPU AdamW parameters/s with `tierflow.optim.adamw_` (and on the device);
* contention (CPU device): compute time lost per second of AdamW running beside it.

Results are cached per machine as JSON in ``$XDG_CACHE_HOME/tierflow/calibration-<host>.json``
(default ``~/.cache``), one entry per device type and dtype, reused unless recalibrating.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .cost import Calibration
from .optim import HyperParams, PendingUpdate, adamw_

CACHE_VERSION = 1
MIB = 2**20
SEQ_LEN = 256  # tokens of the reference block's batch (tierflow train's default)


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


# ---- measurements -----------------------------------------------------------------------

def _best_time(fn, repeats: int = 3, warmup: int = 1, sync=lambda: None) -> float:
    """Fastest of `repeats` runs: the machine's capability, least disturbed by other load."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def _sync(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 2
    seconds = _best_time(lambda: [a @ b for _ in range(reps)], sync=_sync(device))
    return 2 * n**3 * reps / seconds


class _Block(nn.Module):
    """A Llama-style decoder block in plain torch (the reference workload)."""

    def __init__(self, width: int):
        super().__init__()
        self.heads, inter = max(1, width // 64), 8 * width // 3
        self.norm1, self.norm2 = nn.RMSNorm(width), nn.RMSNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        self.up = nn.Linear(width, 2 * inter, bias=False)
        self.down = nn.Linear(inter, width, bias=False)

    def forward(self, x):
        b, s, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, w)
        x = x + self.out(attn)
        gate, up = self.up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def block_flops(device: torch.device, dtype: torch.dtype, width: int, layers: int = 2) -> tuple:
    """(width, forward FLOP/s, backward FLOP/s) of a training step of `layers` blocks."""
    model = nn.Sequential(*[_Block(width) for _ in range(layers)]).to(device, dtype)
    x = torch.randn(1, SEQ_LEN, width, device=device, dtype=dtype, requires_grad=True)
    matrix = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    fwd_flops = 2 * SEQ_LEN * matrix + 4 * SEQ_LEN**2 * width * layers
    sync, fwd, bwd = _sync(device), [], []
    for i in range(4):
        start = time.perf_counter()
        out = model(x)
        sync()
        mid = time.perf_counter()
        out.sum().backward()
        sync()
        if i:  # the first is a warm-up
            fwd.append(mid - start)
            bwd.append(time.perf_counter() - mid)
    return width, fwd_flops / statistics.median(fwd), 2 * fwd_flops / statistics.median(bwd)


def memcpy_bps(nbytes: int = 64 * MIB) -> float:
    src = torch.ones(nbytes // 4)
    dst = torch.zeros_like(src)
    return nbytes / _best_time(lambda: dst.copy_(src), repeats=5)


def fresh_copy_bps(nbytes: int = 16 * MIB, count: int = 8) -> float:
    """A copy into a newly allocated buffer each time (page faults included), as a CPU fetch does."""
    from .device import return_freed_memory_to_os

    return_freed_memory_to_os()
    src = torch.ones(nbytes // 4)
    return nbytes * count / _best_time(lambda: [torch.empty_like(src).copy_(src) for _ in range(count)])


def link_bps(device: torch.device, nbytes: int = 256 * MIB) -> tuple[float, float]:
    """(host->device, device->host) bytes/s between pinned host memory and the GPU."""
    host = torch.ones(nbytes // 4, pin_memory=True)
    dev = torch.empty(nbytes // 4, device=device)
    sync = _sync(device)
    h2d = _best_time(lambda: dev.copy_(host, non_blocking=True), sync=sync)
    d2h = _best_time(lambda: host.copy_(dev, non_blocking=True), sync=sync)
    return nbytes / h2d, nbytes / d2h


def nvme_bps(directory, total: int = 256 * MIB, chunk: int = 8 * MIB) -> tuple[float, float]:
    """(read, write) bytes/s of NvmeStore, four `chunk` requests in flight at a time."""
    from .storage import BufferPool, NvmeStore

    made = directory is None
    directory = Path(directory) if directory else _scratch_dir()
    store = NvmeStore(directory, io_threads=2, file_name="tierflow-calibrate.bin", chunk_bytes=chunk)
    pool = BufferPool(4, chunk)
    try:
        extent = store.allocate(total)
        buffers = [pool.acquire() for _ in range(4)]
        for buf in buffers:
            buf.fill_(7)

        def sweep(write: bool) -> None:
            io = store.write_async if write else store.read_async
            for offset in range(0, total, 4 * chunk):
                futures = [io(extent, buf, offset + i * chunk) for i, buf in enumerate(buffers)
                           if offset + i * chunk < total]
                for future in futures:
                    future.result()

        write = _best_time(lambda: sweep(True), repeats=2)
        read = _best_time(lambda: sweep(False), repeats=2)
        for buf in buffers:
            pool.release(buf)
        return total / read, total / write
    finally:
        store.close()
        if made:
            shutil.rmtree(directory, ignore_errors=True)


def _scratch_dir() -> Path:
    """A temporary directory under the user cache (a real disk, unlike a tmpfs /tmp)."""
    try:
        cache_path().parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="calibrate-", dir=cache_path().parent))
    except OSError:
        return Path(tempfile.mkdtemp(prefix="tierflow-calibrate-"))


def _adamw_state(numel: int, device: torch.device):
    master, grad = torch.randn(numel, device=device), torch.randn(numel, device=device)
    update = PendingUpdate(None, HyperParams(1e-4, 0.9, 0.999, 1e-8, 0.01, True), 1, None)
    return (master, grad, torch.zeros_like(master), torch.zeros_like(master)), update


def adamw_params_per_s(device: torch.device = torch.device("cpu"), numel: int = 8 * 2**20) -> float:
    arrays, update = _adamw_state(numel, device)
    return numel / _best_time(lambda: adamw_(*arrays, update), repeats=5, sync=_sync(device))


def contention(width: int = 512) -> float:
    """Compute seconds lost per second of AdamW running in another thread (CPU)."""
    model = nn.Sequential(_Block(width), _Block(width))
    x = torch.randn(1, SEQ_LEN, width, requires_grad=True)
    step = lambda: model(x).sum().backward()  # noqa: E731
    alone = _best_time(step, repeats=3)
    arrays, update = _adamw_state(2 * 2**20, torch.device("cpu"))
    one = _best_time(lambda: adamw_(*arrays, update), repeats=3)
    stop, done = threading.Event(), [0]

    def background():
        while not stop.is_set():
            adamw_(*arrays, update)
            done[0] += 1

    thread = threading.Thread(target=background, daemon=True)
    thread.start()
    try:
        start = time.perf_counter()
        for _ in range(3):
            step()
        busy = (time.perf_counter() - start) / 3
    finally:
        stop.set()
        thread.join()
    work = done[0] * one / 3  # seconds the background work takes alone, per compute step
    return min(1.5, max(0.0, (busy - alone) / work)) if work > 0 else 0.0


def calibrate(device: str = "cpu", dtype: torch.dtype = torch.float32, nvme_dir=None, log=None) -> Calibration:
    """Measure every figure of `Calibration` on this machine."""
    log = log or (lambda text: None)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    widths = (1024, 2048, 4096) if dev.type == "cuda" else (256, 512, 1024)
    log("compute ...")
    flops = matmul_flops(dev, dtype)
    blocks = tuple(block_flops(dev, dtype, w) for w in widths)
    log("memory ...")
    memcpy = memcpy_bps()
    if dev.type == "cuda":
        h2d, d2h = link_bps(dev)
        device_adamw = adamw_params_per_s(dev)
    else:
        h2d = d2h = fresh_copy_bps()
        device_adamw = None
    log("NVMe ...")
    nvme_read, nvme_write = nvme_bps(nvme_dir)
    log("optimizer ...")
    adamw = adamw_params_per_s()
    share = contention() if dev.type == "cpu" else 0.0
    return Calibration(
        device=dev.type, dtype=str(dtype).removeprefix("torch."), matmul_flops=flops, block_flops=blocks,
        memcpy_bps=memcpy, h2d_bps=h2d, d2h_bps=d2h, nvme_read_bps=nvme_read, nvme_write_bps=nvme_write,
        adamw_params_per_s=adamw, device_adamw_params_per_s=device_adamw or adamw, contention=share,
        cores=torch.get_num_threads(), host=socket.gethostname(), created=time.time())


# ---- report -----------------------------------------------------------------------------

def describe(cal: Calibration) -> list[str]:
    """Human-readable lines, one figure each."""
    g = 1e9
    lines = [f"device {cal.device}, dtype {cal.dtype}, {cal.cores} compute threads, host {cal.host}",
             f"matmul                {cal.matmul_flops / g:8.1f} GFLOP/s"]
    for width, fwd, bwd in cal.block_flops:
        lines.append(f"block width {width:<5}     {fwd / g:8.1f} GFLOP/s forward, {bwd / g:.1f} backward")
    lines += [f"memcpy                {cal.memcpy_bps / g:8.2f} GB/s",
              f"host->device          {cal.h2d_bps / g:8.2f} GB/s" + (" (copy into a new buffer)" if cal.device == "cpu" else ""),
              f"device->host          {cal.d2h_bps / g:8.2f} GB/s",
              f"NVMe read / write     {cal.nvme_read_bps / g:8.2f} / {cal.nvme_write_bps / g:.2f} GB/s",
              f"AdamW (CPU)           {cal.adamw_params_per_s / g:8.3f} G params/s",
              f"AdamW (device)        {cal.device_adamw_params_per_s / g:8.3f} G params/s",
              f"contention            {cal.contention:8.2f} s compute lost per s of CPU work beside it"]
    return lines


def run_calibrate_bench(device: str = "cpu", dtype: str | None = None, nvme_dir=None,
                        recalibrate: bool = False, json_path=None) -> Calibration:
    """`tierflow bench calibrate`: print (and cache) this machine's figures."""
    from .config import parse_device, parse_dtype

    dev = parse_device(device)
    torch_dtype = parse_dtype(dtype) or torch.float32
    start = time.perf_counter()
    cal, cached = get_calibration(str(dev), torch_dtype, nvme_dir, recalibrate,
                                  log=lambda text: print(f"calibrating {text}", flush=True))
    where = cache_path()
    print(f"calibration {'from cache' if cached else f'measured in {time.perf_counter() - start:.1f} s'}: {where}")
    for line in describe(cal):
        print("  " + line)
    if json_path:
        Path(json_path).write_text(json.dumps(cal.to_dict(), indent=2) + "\n")
    return cal
