"""`tierflow bench optim`: tierflow's CPU AdamW against torch's and DeepSpeed's, and memcpy.

All contenders update the same flat fp32 arrays of `numel` parameters (master weights,
gradient, two moments), one after another, in an order that rotates from round to round
so that machine noise hits all alike; figures are medians over `repeats` (each the mean
of 3 rounds).

* `tierflow`: the engine's own update code, `tierflow.runtime.updates.apply_updates`, over
  host-resident state as the engine sets it up without an NVMe tier: one window per
  parameter (here the whole array), each updated by `tierflow.runtime.updates.adamw_`;
* `tierflow-8MiB`: the same over 8 MiB windows, as the engine splits the work when it
  has staging buffers (an NVMe tier; default chunk_bytes 8 MiB), host units included;
* `torch-fused`: `torch.optim.AdamW(fused=True)` (foreach=True where fused is unsupported);
* `torch-foreach`: `torch.optim.AdamW(foreach=True)`;
* `deepspeed`: `deepspeed.ops.adam.DeepSpeedCPUAdam`, when DeepSpeed imports and builds;
* `memcpy`: `dst.copy_(src)` over 1 GiB fp32 tensors, the machine's plain copy bandwidth;
* `in-place`: `x.mul_(1.0)` over 1 GiB, which like AdamW reads and writes the same memory.
  A copy also reads its destination into the cache before writing it (write-allocate),
  traffic that "bytes read + written" does not count, so AdamW can exceed 100% of memcpy.

An AdamW step reads master, gradient and both moments (16 bytes per parameter) and
writes master and both moments (12 bytes): 28 bytes per parameter. The bf16 variant adds
the engine's mixed-precision write-out, `weights.copy_(master)` into bf16 weights.
"""
from __future__ import annotations

import os
import statistics
import time
from types import SimpleNamespace

import torch

from tierflow.bench.report import print_row, row, write_json
from tierflow.memory.device import ComputeDevice
from tierflow.runtime.updates import HyperParams, PendingUpdate, apply_updates
from tierflow.memory.pool import BufferPool
from tierflow.memory.tiers import StateIO, UnitState

__all__ = ["run_optim_bench"]

G = 1e9
BYTES_PER_PARAM = 28           # fp32 master/grad/m/v read (16 B), master/m/v written (12 B)
WINDOW_BYTES = 8 * 2**20       # the engine's default staging buffer (chunk_bytes)
MEMCPY_ELEMENTS = 2**28            # 1 GiB of fp32
LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 1e-8, 0.01


# ---- state --------------------------------------------------------------------------------

def _make_state(numel: int) -> dict[str, torch.Tensor]:
    """Flat fp32 arrays of one parameter, touched (so page faults are not timed), plus bf16 weights."""
    gen = torch.Generator().manual_seed(0)
    state = {"master": torch.randn(numel, generator=gen), "grad": torch.randn(numel, generator=gen),
             "exp_avg": torch.zeros(numel), "exp_avg_sq": torch.zeros(numel)}
    state["weights"] = state["master"].to(torch.bfloat16)
    return state


def _fused_supported() -> bool:
    """True if torch.optim.AdamW(fused=True) runs on CPU tensors in this torch build."""
    p = torch.nn.Parameter(torch.zeros(8))
    p.grad = torch.ones(8)
    try:
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


# ---- contenders: each returns a function doing one optimizer step ---------------------------

def _tierflow_step(state: dict, window_bytes: int | None, fused: bool, bf16: bool):
    """One engine update of host-resident state: `tierflow.runtime.updates.apply_updates`, the engine's
    own code, window by window (whole parameters without staging buffers, else windows of
    one staging buffer), then with `bf16` the write-out of each window into bf16 weights."""
    names = ["master", "grad", "exp_avg", "exp_avg_sq"] + (["weights"] if bf16 else [])
    unit_state = UnitState("host", {n: state[n] for n in names}, {n: state[n].dtype for n in names})
    pool = BufferPool(1, window_bytes) if window_bytes else None  # only its size is used here
    io = StateIO(ComputeDevice(torch.device("cpu")), budgets={}, nvme=None, pool=pool)
    hp = HyperParams(LR, BETAS[0], BETAS[1], EPS, WEIGHT_DECAY, fused)
    slot = SimpleNamespace(offset=0, numel=state["master"].numel())  # the parts of a Slot it reads
    count = [0]

    def step():
        count[0] += 1
        apply_updates(io, io.device, unit_state, [PendingUpdate(slot, hp, count[0], grad_scale=None)])
    return step


def _torch_step(state: dict, bf16: bool, **flavour):
    """torch.optim.AdamW over the same arrays (its parameter and state share their memory)."""
    param = torch.nn.Parameter(state["master"])
    param.grad = state["grad"]
    opt = torch.optim.AdamW([param], lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **flavour)
    opt.state[param] = {"step": torch.tensor(0.0), "exp_avg": state["exp_avg"],
                        "exp_avg_sq": state["exp_avg_sq"]}

    def step():
        opt.step()
        if bf16:
            state["weights"].copy_(param.detach())
    return step


def _deepspeed_step(state: dict):
    """DeepSpeedCPUAdam over the same arrays, or (None, error text) if it cannot be had."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        param = torch.nn.Parameter(state["master"])
        param.grad = state["grad"]
        print("DeepSpeed: loading CPUAdam (compiles on first use, about a minute) ...", flush=True)
        opt = DeepSpeedCPUAdam([param], lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                               adamw_mode=True)
    except Exception as exc:  # ImportError, or a build failure of its JIT op
        return None, f"{type(exc).__name__}: {exc}"
    opt.state[param] = {"step": 0, "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
    return opt.step, None


# ---- timing -------------------------------------------------------------------------------

def _time(fn, calls: int) -> float:
    """Seconds per call of `fn`, over `calls` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def _interleaved(contenders: dict, repeats: int, rounds: int = 3) -> dict[str, float]:
    """Median seconds per call of each contender (name -> (function, calls in a row)).

    Each repeat is `rounds` rounds; a round runs every contender once (its calls in a row),
    in an order that rotates from round to round, so slow drifts of the machine hit all
    contenders alike. A repeat's figure is the contender's mean over its rounds."""
    names = list(contenders)
    for fn, _ in contenders.values():  # warm-up: first touch, lazy initialisation, JIT loading
        fn()
    samples = {name: [] for name in names}
    for r in range(repeats):
        total = dict.fromkeys(names, 0.0)
        for k in range(rounds):
            shift = (r * rounds + k) % len(names)
            for name in names[shift:] + names[:shift]:
                fn, calls = contenders[name]
                total[name] += _time(fn, calls)
        for name in names:
            samples[name].append(total[name] / rounds)
    return {name: statistics.median(times) for name, times in samples.items()}


def _calls_in_a_row(numel: int) -> int:
    """One AdamW call at 1e8 parameters; more for small arrays, so a timing is not all noise."""
    return max(1, min(50, 100_000_000 // max(numel, 1)))


# ---- the benchmark ------------------------------------------------------------------------

def run_optim_bench(numel: int = 100_000_000, repeats: int = 5, json_path=None,
                    include_deepspeed: bool = True) -> list[dict]:
    """Measure and print tierflow's CPU AdamW against its references; returns the rows.

    `include_deepspeed=False` skips DeepSpeed (its import and JIT build take seconds to minutes).
    """
    fused = _fused_supported()
    best_torch = "torch-fused" if fused else "torch-foreach"
    print(f"AdamW on {numel:,} fp32 params, {torch.get_num_threads()} threads, median of {repeats}; "
          f"torch's fastest CPU AdamW: {'fused=True' if fused else 'foreach=True (fused unsupported)'}",
          flush=True)
    steps, ds_error = _build_contenders(numel, fused, include_deepspeed)
    calls = _calls_in_a_row(numel)
    contenders = {name: (fn, calls) for name, fn in steps.items() if fn is not None}
    contenders.update(_copies())
    seconds = _interleaved(contenders, repeats)
    copy_bytes = 2 * MEMCPY_ELEMENTS * 4  # read + written
    memcpy_gbps = copy_bytes / seconds.pop("memcpy") / G
    inplace_gbps = copy_bytes / seconds.pop("in-place") / G
    rate = {name: numel / s / G for name, s in seconds.items()}  # G params/s

    rows = _rows(rate, memcpy_gbps, inplace_gbps, best_torch)
    for r in rows:
        print_row(r)
    if "deepspeed" not in rate:
        print(f"DeepSpeed CPUAdam not measured: {ds_error}")
    tf_gbps = rate["tierflow"] * BYTES_PER_PARAM
    print(f"memcpy {memcpy_gbps:.1f} GB/s (read+written); tierflow AdamW moves {BYTES_PER_PARAM} B/param: "
          f"{tf_gbps:.1f} GB/s = {tf_gbps / memcpy_gbps:.0%} of memcpy (target >= 60%); "
          f"tierflow / {best_torch} = {rate['tierflow'] / rate[best_torch]:.2f}x (target >= 1.0x)")
    write_json(rows, json_path)
    return rows


def _build_contenders(numel: int, fused: bool, include_deepspeed: bool) -> tuple[dict, str | None]:
    """(name -> step function, all over one shared set of arrays; why DeepSpeed is missing).
    A contender that cannot run here is None."""
    state = _make_state(numel)
    best = {"fused": True} if fused else {"foreach": True}
    steps = {
        "tierflow": _tierflow_step(state, None, fused, bf16=False),
        "tierflow-8MiB": _tierflow_step(state, WINDOW_BYTES, fused, bf16=False),
        "torch-fused": _torch_step(state, bf16=False, fused=True) if fused else None,
        "torch-foreach": _torch_step(state, bf16=False, foreach=True),
        "tierflow-bf16": _tierflow_step(state, None, fused, bf16=True),
        "tierflow-bf16-8MiB": _tierflow_step(state, WINDOW_BYTES, fused, bf16=True),
        "torch-bf16": _torch_step(state, bf16=True, **best),
    }
    ds_error = "not requested (include_deepspeed=False)"
    if include_deepspeed:
        steps["deepspeed"], ds_error = _deepspeed_step(state)
    return steps, ds_error


def _copies() -> dict:
    """The bandwidth references over 1 GiB fp32 tensors, as (function, calls per sample):
    `memcpy` is `dst.copy_(src)`; `in-place` is `src.mul_(1.0)`, which reads and writes the
    same memory as AdamW does (a copy's destination is also read into the cache before it
    is written, traffic that "bytes read + written" does not count)."""
    src = torch.ones(MEMCPY_ELEMENTS)
    dst = torch.zeros(MEMCPY_ELEMENTS)  # touched, so page faults are not timed
    return {"memcpy": ((lambda: dst.copy_(src)), 1), "in-place": ((lambda: src.mul_(1.0)), 1)}


def _rows(rate: dict, memcpy_gbps: float, inplace_gbps: float, best_torch: str) -> list[dict]:
    unit = "G params/s"
    tf = rate["tierflow"]
    return [
        row(f"adamw fp32 vs {best_torch}", tf, rate[best_torch], unit),
        row(f"adamw fp32 8MiB windows vs {best_torch}", rate["tierflow-8MiB"], rate[best_torch], unit),
        row("adamw fp32 vs torch-foreach", tf, rate["torch-foreach"], unit),
        row("adamw fp32 vs deepspeed CPUAdam", tf, rate.get("deepspeed"), unit),
        row("adamw bandwidth vs memcpy", tf * BYTES_PER_PARAM, memcpy_gbps, "GB/s"),
        row("adamw bandwidth vs in-place mul_", tf * BYTES_PER_PARAM, inplace_gbps, "GB/s"),
        row(f"adamw+bf16 out vs {best_torch}+copy", rate["tierflow-bf16"], rate["torch-bf16"], unit),
        row(f"adamw+bf16 out 8MiB vs {best_torch}+copy", rate["tierflow-bf16-8MiB"], rate["torch-bf16"], unit),
    ]
