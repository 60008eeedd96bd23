"""The physical figures that bound an offloaded training step, measured in the same run as
the step (`tierflow bench throughput` prints each contender's distance from them)."""
from __future__ import annotations

import time

import torch

# Per step, per trainable parameter whose state is off the device (see `limits`), with bf16
# compute: the gradient stays bf16 off the device (runtime/gradients.py), 2 B each way.
HOST_BYTES_PER_PARAM = 28


def _best_seconds(fn, repeats: int = 3) -> float:
    fn()  # warm-up (allocations, page faults)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def limits(device: str, nbytes: int = 1 << 30) -> dict:
    """The machine's physical figures that bound an offloaded step, measured now:

    * host_copy_bps: bytes read + written per second by a 1 GiB host copy (all cores): host
      memory bandwidth. AdamW of state in host memory moves HOST_BYTES_PER_PARAM per
      parameter per step through it (read master, both moments and the bf16 gradient: 14 B;
      write master and moments: 12 B; the gradient written by the drain: 2 B; 32 B with fp32
      gradients), whether the arithmetic runs on the CPU or the arrays cross to the GPU and back;
    * cpu_adamw_params_per_s: torch's fused AdamW on the CPU over 64 M fp32 parameters;
    * h2d_bps, d2h_bps, duplex_bps: pinned 1 GiB copies each way alone, and both at once on
      two streams (the sum of both directions)."""
    out = {"host_copy_bps": host_copy_bps(nbytes), "cpu_adamw_params_per_s": cpu_adamw_params_per_s()}
    if torch.device(device).type == "cuda":
        out.update(pcie_bps(device, nbytes))
    return out


def host_copy_bps(nbytes: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best_seconds(lambda: dst.copy_(src))


def cpu_adamw_params_per_s(n: int = 1 << 26) -> float:
    arrays = [torch.rand(n) for _ in range(4)]
    step = torch.tensor(1.0)

    def adamw():
        torch._fused_adamw_([arrays[0]], [arrays[1]], [arrays[2]], [arrays[3]], [], [step], lr=1e-4, beta1=0.9,
                            beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False)
    return n / _best_seconds(adamw)


def pcie_bps(device: str, nbytes: int) -> dict:
    host = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    gpu_buf = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(2)]
    up, down = torch.cuda.Stream(), torch.cuda.Stream()

    def copy(h2d: bool, d2h: bool):
        if h2d:
            with torch.cuda.stream(up):
                gpu_buf[0].copy_(host[0], non_blocking=True)
        if d2h:
            with torch.cuda.stream(down):
                host[1].copy_(gpu_buf[1], non_blocking=True)
        torch.cuda.synchronize()
    return {"h2d_bps": nbytes / _best_seconds(lambda: copy(True, False)),
            "d2h_bps": nbytes / _best_seconds(lambda: copy(False, True)),
            "duplex_bps": 2 * nbytes / _best_seconds(lambda: copy(True, True))}


def describe_limits(lim: dict) -> str:
    g = 1e9
    text = (f"machine: host memory {lim['host_copy_bps'] / g:.0f} GB/s (copy, read + write), CPU fused AdamW "
            f"{lim['cpu_adamw_params_per_s'] / g:.2f} G params/s")
    if "h2d_bps" in lim:
        text += (f", pinned host->device {lim['h2d_bps'] / g:.1f} GB/s, device->host {lim['d2h_bps'] / g:.1f} GB/s, "
                 f"both at once {lim['duplex_bps'] / g:.1f} GB/s in all")
    return text


def host_memory_bound(r: dict, lim: dict) -> float:
    """Seconds per step the host memory needs for AdamW of the off-device state alone."""
    return HOST_BYTES_PER_PARAM * r["offdevice_trainable"] / lim["host_copy_bps"]
