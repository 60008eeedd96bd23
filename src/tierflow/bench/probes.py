"""Measurement probes of `tierflow bench calibrate` (see `tierflow.calibrate`): each returns one
figure of this machine, measured the way the engine does the work."""
from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from tierflow.runtime.updates import HyperParams, PendingUpdate, adamw_

MIB = 2**20
SEQ_LEN = 256  # tokens of the reference model's batch (tierflow train's default)


def load_mark() -> tuple[float, float, float] | None:
    """(CPU seconds of the whole machine, incl. time stolen by the hypervisor; of this process;
    wall clock) now, for `others_load`; None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    own = os.times()
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    return busy, own.user + own.system, time.perf_counter()


def others_load(mark) -> float:
    """Cores that other processes (and the hypervisor) used since `mark` (0 when unknown)."""
    now = load_mark()
    if mark is None or now is None or now[2] <= mark[2]:
        return 0.0
    return max(0.0, (now[0] - mark[0]) - (now[1] - mark[1])) / (now[2] - mark[2])


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


def reference_model(width: int, layers: int = 2):
    """A small Llama (byte vocabulary) of the given width: the reference compute workload."""
    import warnings

    from transformers import AutoModelForCausalLM, LlamaConfig

    heads = max(1, width // 64)
    cfg = LlamaConfig(vocab_size=259, hidden_size=width, intermediate_size=(8 * width // 3 + 63) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=SEQ_LEN, use_cache=False, tie_word_embeddings=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(cfg)


def _step_times(device: torch.device, dtype: torch.dtype, width: int, layers: int) -> tuple:
    """(forward FLOPs, median forward s, median backward s) of the reference model, FLOPs
    counted as `cost.workload` counts them. Gradients are new tensors each time, as in the
    engine (which takes each away). Medians, as training steps are measured: the fastest of a
    few runs made the rate of a layer (a difference of two models' times) swing by 30 %."""
    from tierflow.core.cost import workload
    from tierflow.core.layout import partition

    model = reference_model(width, layers).to(device, dtype)
    units, _ = partition(model, 2**62)
    flops = sum(workload(model, units, 1, SEQ_LEN, dtype).unit_flops)
    ids = torch.randint(0, 256, (1, SEQ_LEN), device=device)
    sync, fwd, bwd = _sync(device), [], []
    for i in range(8):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        sync()
        mid = time.perf_counter()
        loss.backward()
        sync()
        if i:  # the first is a warm-up
            fwd.append(mid - start)
            bwd.append(time.perf_counter() - mid)
    return flops, statistics.median(fwd), statistics.median(bwd)


def block_flops(device: torch.device, dtype: torch.dtype, width: int) -> tuple:
    """(width, forward FLOP/s, backward FLOP/s, forward s, backward s): the rate of each extra
    decoder layer (from models of 1 and 3 layers) and the time of the rest of a step that does
    not grow with depth (embedding, head, loss, masks; beyond its FLOPs at that rate)."""
    f1, fwd1, bwd1 = _step_times(device, dtype, width, 1)
    f3, fwd3, bwd3 = _step_times(device, dtype, width, 3)
    layer_flops = f3 - f1
    fwd_rate = layer_flops / max(fwd3 - fwd1, 1e-9)
    bwd_rate = 2 * layer_flops / max(bwd3 - bwd1, 1e-9)
    if fwd3 <= fwd1 or bwd3 <= bwd1:  # too noisy to tell: one rate for everything
        fwd_rate, bwd_rate = f3 / fwd3, 2 * f3 / bwd3
    return (width, fwd_rate, bwd_rate, max(0.0, fwd1 - f1 / fwd_rate), max(0.0, bwd1 - 2 * f1 / bwd_rate))


@contextlib.contextmanager
def engine_threads(count: int = 2):
    """Threads like the engine's transfer and drain threads, each having run a parallel op. On a
    CPU their mere existence slows compute (OpenMP thread teams beyond the cores), as in training."""
    pools = [ThreadPoolExecutor(1) for _ in range(count)]
    try:
        data = torch.ones(2**20)
        for pool in pools:
            pool.submit(lambda: data.mul(2).sum()).result()
        yield
    finally:
        for pool in pools:
            pool.shutdown()


def memcpy_bps(nbytes: int = 64 * MIB) -> float:
    src = torch.ones(nbytes // 4)
    dst = torch.zeros_like(src)
    return nbytes / _best_time(lambda: dst.copy_(src), repeats=5)


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
    from tierflow.memory.nvme import NvmeStore
    from tierflow.memory.pool import BufferPool

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
    from tierflow.core.figures import cache_path

    try:
        cache_path().parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="calibrate-", dir=cache_path().parent))
    except OSError:
        return Path(tempfile.mkdtemp(prefix="tierflow-calibrate-"))


def io_beside_compute(device: torch.device, directory=None, width: int = 512) -> float:
    """Share of NVMe bandwidth lost while a training step computes beside the I/O (the I/O threads
    then wait for the cores, more so as the engine lowers their priority)."""
    alone = nvme_bps(directory, total=128 * MIB)
    model = reference_model(width).to(device)
    ids = torch.randint(0, 256, (1, SEQ_LEN), device=device)
    stop = threading.Event()

    def compute():
        while not stop.is_set():
            model(input_ids=ids, labels=ids).loss.backward()
            _sync(device)()

    thread = threading.Thread(target=compute, daemon=True)
    thread.start()
    try:
        time.sleep(0.2)
        beside = nvme_bps(directory, total=128 * MIB)
    finally:
        stop.set()
        thread.join()
    kept = (beside[0] / alone[0] + beside[1] / alone[1]) / 2
    return min(0.9, max(0.0, 1 - kept))


def _adamw_state(numel: int, device: torch.device, scale=None):
    master, grad = torch.randn(numel, device=device), torch.randn(numel, device=device)
    update = PendingUpdate(None, HyperParams(1e-4, 0.9, 0.999, 1e-8, 0.01, True), 1, scale)
    return (master, grad, torch.zeros_like(master), torch.zeros_like(master)), update


def adamw_params_per_s(device: torch.device = torch.device("cpu"), numel: int = 16 * 2**20,
                       params: int = 8) -> float:
    """AdamW as the engine applies it: parameter by parameter over a unit's arrays, the
    gradient scaled by a clip coefficient first."""
    arrays, update = _adamw_state(numel, device, torch.tensor(0.5))
    step = numel // params

    def run():
        for start in range(0, numel, step):
            adamw_(*(a[start:start + step] for a in arrays), update)
    return numel / _best_time(run, repeats=5, sync=_sync(device))


def drain_bps(nbytes: int = 16 * MIB, count: int = 8) -> float:
    """Gradient bytes/s the drain thread handles on the CPU: each gradient's norm, then a copy
    into its fp32 array (sources beyond the caches, as after a backward)."""
    sources = [torch.ones(nbytes // 4) for _ in range(count)]
    dst = torch.zeros(nbytes // 4)

    def run():
        for src in sources:
            torch.linalg.vector_norm(src)
            dst.copy_(src)
    return nbytes * count / _best_time(run)


def contention(width: int = 512) -> tuple[float, float]:
    """(share of compute speed lost, share of CPU work's speed lost) while AdamW runs in another
    thread beside a training step on a CPU device. The first is measured; the second follows
    from the cores being shared: what compute loses, the other work gets."""
    model = reference_model(width)
    ids = torch.randint(0, 256, (1, SEQ_LEN))
    step = lambda: model(input_ids=ids, labels=ids).loss.backward()  # noqa: E731
    arrays, update = _adamw_state(2 * 2**20, torch.device("cpu"))
    stop = threading.Event()

    def background():
        while not stop.is_set():
            adamw_(*arrays, update)

    lost = []
    for _ in range(2):
        alone = _best_time(step, repeats=3)
        stop.clear()
        thread = threading.Thread(target=background, daemon=True)
        thread.start()
        try:
            time.sleep(0.05)  # let it run first
            beside = _best_time(step, repeats=3, warmup=0)
        finally:
            stop.set()
            thread.join()
        lost.append(max(0.0, 1 - alone / beside))
    share = min(0.9, max(0.1, statistics.median(lost)))
    return share, 1 - share


class _Chain(nn.Module):
    """Many small Linear layers: a model whose step time is mostly the engine's bookkeeping."""

    def __init__(self, layers: int, width: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def unit_overhead(device: torch.device, layers: int = 48, width: int = 128) -> tuple[float, float]:
    """Seconds per unit and step that the engine adds to a plain PyTorch step (hooks, fetch and
    update jobs, gradient drains, thread hand-offs), for device-resident and for streamed units."""
    import tierflow

    x = torch.randn(16, width, device=device)

    def median_step(model, opt, clip) -> float:
        times = []
        for _ in range(10):
            start = time.perf_counter()
            model(x).pow(2).mean().backward()
            clip()
            opt.step()
            opt.zero_grad()
            _sync(device)()
            times.append(time.perf_counter() - start)
        return statistics.median(times[2:])

    plain = _Chain(layers, width).to(device)
    plain_opt = torch.optim.AdamW(plain.parameters())
    base = median_step(plain, plain_opt, lambda: torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0))
    result = []
    for placement in ("device", "host"):
        engine = tierflow.offload(_Chain(layers, width), device=str(device), placement=placement,
                                  unit_bytes=(width + 1) * width * 4)
        try:
            opt = tierflow.AdamW(engine)
            step = median_step(engine, opt, lambda: opt.clip_grad_norm_(1.0))
            result.append(max(0.0, step - base) / len(engine.units))
        finally:
            engine.close()
    return result[0], result[1]
