"""The cost model: bytes per tensor class and tier, peak memory per tier, and step time.

Pure arithmetic over unit sizes, a `plan.Placement` and measured machine figures
(`Calibration`, from `tierflow bench calibrate`); nothing here touches a device, so
`tierflow plan` can answer before any memory is allocated.

Step time follows what the engine does in one step (see engine.py):

* forward: the transfer thread runs, unit by unit in model order, the lazy AdamW
  update of each unit (reading master, gradient and moments from its home tier,
  writing master and moments back) and copies the new weights to the device; the
  compute of unit i waits for its job, and job i may start only once it enters
  the prefetch window (`prefetch_bytes` ahead of the compute);
* backward: units evicted from a bounded device budget are fetched again (same
  pipeline, reverse order); a drain thread writes each unit's gradients to its
  home tier as they appear, and the step waits for the last one.

Each job is I/O (NVMe, host<->device) plus CPU work (AdamW, memory copies); on a
CPU device that CPU work also slows the compute running beside it, by the
measured `contention` factor.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from .layout import Unit
from .plan import TIERS, Placement, working_bytes
from .tiers import ALIGN, ARRAY_CLASS, array_specs

CLASSES = ("weights", "master", "grads", "moments", "activations", "buffers", "working", "staging")
ADAMW_READ, ADAMW_WRITE = 16, 12  # fp32 bytes per parameter an AdamW step reads / writes


@dataclass(frozen=True)
class Calibration:
    """Measured figures of one machine, device and compute dtype (rates per second).

    `block_flops` holds (width, forward FLOP/s, backward FLOP/s) of a reference
    transformer block's training step at a few widths; `contention` is the compute
    time lost per second of other CPU work running beside it (CPU device only).
    """

    device: str
    dtype: str
    matmul_flops: float
    block_flops: tuple
    memcpy_bps: float
    h2d_bps: float
    d2h_bps: float
    nvme_read_bps: float
    nvme_write_bps: float
    adamw_params_per_s: float
    device_adamw_params_per_s: float
    contention: float
    cores: int
    host: str = ""
    created: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["block_flops"] = tuple(tuple(row) for row in values.get("block_flops", ()))
        return cls(**values)

    def block_rate(self, width: int) -> tuple[float, float]:
        """(forward, backward) FLOP/s at a model width, interpolated between measured widths."""
        rows = sorted(self.block_flops)
        if not rows:
            return self.matmul_flops, self.matmul_flops
        if width <= rows[0][0]:
            return rows[0][1], rows[0][2]
        for (w0, f0, b0), (w1, f1, b1) in zip(rows, rows[1:]):
            if width <= w1:
                a = (width - w0) / (w1 - w0)
                return f0 + a * (f1 - f0), b0 + a * (b1 - b0)
        return rows[-1][1], rows[-1][2]


@dataclass(frozen=True)
class Workload:
    """The compute of one micro-batch: forward FLOPs of each unit and the activations."""

    tokens: int
    unit_flops: tuple
    width: int
    activation_bytes: int


@dataclass(frozen=True)
class StepPrediction:
    """Predicted seconds of one optimizer step (one micro-batch) and its bottleneck."""

    step_s: float
    compute_s: float
    transfer_s: float
    optimizer_s: float
    forward_s: float
    backward_s: float
    bottleneck: str


@dataclass(frozen=True)
class Job:
    """Work of one thread for one unit: seconds of I/O (disk, host<->device) and of CPU."""

    io_s: float = 0.0
    cpu_s: float = 0.0
    adamw_s: float = 0.0  # part of cpu_s that is the optimizer

    @property
    def seconds(self) -> float:
        return self.io_s + self.cpu_s


# ---- workload ---------------------------------------------------------------------------

def workload(model: torch.nn.Module, units: list[Unit], batch_size: int, seq_len: int,
             compute_dtype: torch.dtype) -> Workload:
    """FLOPs per unit (2 per multiply-add of every matrix parameter, attention shared out in
    proportion) and an activation estimate; works on a meta-device model."""
    tokens = batch_size * seq_len
    matrices = _matrix_params(model)
    flops = [2.0 * tokens * sum(s.numel for s in u.slots if id(s.param) in matrices) for u in units]
    cfg = getattr(model, "config", None)
    width = _config_int(cfg, "hidden_size", "n_embd", "d_model") or _median_width(model)
    layers = _config_int(cfg, "num_hidden_layers", "n_layer", "num_layers") or 0
    attention = 4.0 * batch_size * seq_len ** 2 * width * layers
    total = sum(flops) or 1.0
    flops = [f * (1 + attention / total) for f in flops]
    heads = _config_int(cfg, "num_attention_heads", "n_head") or 1
    vocab = _config_int(cfg, "vocab_size") or 0
    return Workload(tokens, tuple(flops), width,
                    activation_estimate(batch_size, seq_len, width, layers, heads, vocab, compute_dtype))


def activation_estimate(batch: int, seq: int, width: int, layers: int, heads: int, vocab: int,
                        dtype: torch.dtype) -> int:
    """Bytes saved for backward: Korthikanti et al. (2022), 34 + 5*a*s/h bytes per token and
    width at 16 bits per layer (scaled to the dtype), plus fp32 logits and their gradient."""
    per_layer = batch * seq * width * (34 + 5 * heads * seq / width) * dtype.itemsize / 2
    return int(layers * per_layer + 3 * batch * seq * vocab * 4)


def _matrix_params(model: torch.nn.Module) -> set[int]:
    """ids of parameters used as matrices in a product (2-D weights of non-embedding modules)."""
    found = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        for param in module.parameters(recurse=False):
            if param.dim() == 2:
                found.add(id(param))
    return found


def _config_int(cfg, *names: str) -> int | None:
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _median_width(model: torch.nn.Module) -> int:
    sizes = sorted(p.numel() for p in model.parameters() if p.dim() == 2) or [1]
    return max(1, int(sizes[len(sizes) // 2] ** 0.5))


# ---- bytes ------------------------------------------------------------------------------

def class_bytes(units: list[Unit], placement: Placement, compute_dtype: torch.dtype,
                buffer_bytes: int, activation_bytes: int = 0) -> dict[str, dict[str, int]]:
    """tier -> tensor class -> bytes the plan puts there (NVMe: extents, 4 KiB rounded)."""
    table = {tier: dict.fromkeys(CLASSES, 0) for tier in TIERS}
    for unit, home in zip(units, placement.homes):
        for name, (numel, dtype) in array_specs(unit, compute_dtype).items():
            nbytes = numel * dtype.itemsize
            if home == "nvme":
                nbytes = -(-nbytes // ALIGN) * ALIGN
            table[home][ARRAY_CLASS[name]] += nbytes
    table["device"]["working"] = placement.device_working
    table["device"]["buffers"] = buffer_bytes
    table["device"]["activations"] = activation_bytes
    table["host"]["staging"] = placement.staging_bytes
    return table


def streamed_bytes(units: list[Unit], placement: Placement, compute_dtype: torch.dtype) -> int:
    """Bytes of the weights of every unit that does not live on the device."""
    return sum(working_bytes(u, compute_dtype) for u, h in zip(units, placement.homes) if h != "device")


def grads_in_flight(units: list[Unit], compute_dtype: torch.dtype) -> int:
    """Gradient bytes waiting on the device for the drain thread: the largest parameter's (the
    drain thread writes each gradient out while autograd computes the next one)."""
    return max((s.numel * compute_dtype.itemsize for u in units for s in u.slots if s.trainable), default=0)


def peak_bytes(units: list[Unit], placement: Placement, compute_dtype: torch.dtype, buffer_bytes: int,
               device_capacity: int | None) -> dict[str, int]:
    """Peak accounted bytes per tier (what `engine.budget_peaks()` reports; NVMe: file size).

    Device: buffers and device-resident state for good, plus the weights fetched in a step
    (cached until opt.step() or until the budget needs the room) and gradients in flight."""
    state = class_bytes(units, placement, compute_dtype, buffer_bytes)
    resident = buffer_bytes + placement.tier_bytes["device"]
    moving = streamed_bytes(units, placement, compute_dtype) + grads_in_flight(units, compute_dtype)
    if device_capacity is not None:
        moving = min(moving, max(0, device_capacity - resident))
    nvme = sum(v for k, v in state["nvme"].items())
    return {"device": resident + moving, "host": placement.tier_bytes["host"] + placement.staging_bytes,
            "nvme": nvme}


# ---- time -------------------------------------------------------------------------------

def predict_step(units: list[Unit], placement: Placement, work: Workload, cal: Calibration,
                 compute_dtype: torch.dtype, device_capacity: int | None, buffer_bytes: int = 0) -> StepPrediction:
    """Predicted time of one training step (forward, backward, optimizer) in steady state."""
    fwd_rate, bwd_rate = cal.block_rate(work.width)
    fwd_compute = [f / fwd_rate for f in work.unit_flops]
    bwd_compute = [2 * f / bwd_rate for f in work.unit_flops]
    homes = placement.homes
    size = [working_bytes(u, compute_dtype) for u in units]
    updates = [update_job(u, h, cal, compute_dtype) for u, h in zip(units, homes)]
    cached = _cached_after_forward(units, homes, size, placement, compute_dtype, device_capacity, buffer_bytes)
    refetch = [Job() if h == "device" or c else fetch_job(u, h, cal, compute_dtype)
               for u, h, c in zip(units, homes, cached)]
    drains = [drain_job(u, h, cal, compute_dtype) for u, h in zip(units, homes)]

    ahead = _window(size, placement.prefetch_bytes)
    fwd_end, fwd_stall = _pipeline(fwd_compute, updates, ahead)
    order = list(reversed(range(len(units))))
    back_ahead = _window([size[i] for i in order], placement.prefetch_bytes)
    bwd_end, bwd_stall, ready = _pipeline([bwd_compute[i] for i in order], [refetch[i] for i in order],
                                          back_ahead, with_ends=True)
    drain_end = _drain(ready, [drains[i] for i in order])
    tail = max(0.0, drain_end - bwd_end)

    other_cpu = sum(j.cpu_s for j in updates + refetch + drains)
    slowdown = cal.contention * other_cpu if cal.device == "cpu" else 0.0
    compute_s = sum(fwd_compute) + sum(bwd_compute)
    step_s = fwd_end + bwd_end + tail + slowdown
    optimizer_s = sum(j.adamw_s for j in updates)
    transfer_s = sum(j.seconds for j in updates + refetch + drains) - optimizer_s
    stall = fwd_stall + bwd_stall + tail
    return StepPrediction(step_s, compute_s, transfer_s, optimizer_s, fwd_end, bwd_end + tail,
                          _bottleneck(step_s, stall, fwd_stall, updates, transfer_s, optimizer_s))


def update_job(unit: Unit, home: str, cal: Calibration, dtype: torch.dtype) -> Job:
    """The forward job of a unit after opt.step(): AdamW in its home tier, then its weights to
    the device (fused with the update when every parameter is trainable)."""
    t = unit.trainable_numel
    if t == 0:
        return fetch_job(unit, home, cal, dtype)
    rate = cal.device_adamw_params_per_s if home == "device" else cal.adamw_params_per_s
    adamw = t / rate
    cpu, io = adamw, 0.0
    if dtype != torch.float32:  # compute-dtype weights rewritten from the new masters
        cpu += t * dtype.itemsize / cal.memcpy_bps
    if home == "nvme":
        io += t * ADAMW_READ / cal.nvme_read_bps + t * ADAMW_WRITE / cal.nvme_write_bps
        if dtype != torch.float32:
            io += t * dtype.itemsize / cal.nvme_write_bps
    covered = t == unit.numel
    if home != "device":
        if covered:
            io += working_bytes(unit, dtype) / cal.h2d_bps
        else:
            extra = fetch_job(unit, home, cal, dtype)
            io, cpu = io + extra.io_s, cpu + extra.cpu_s
    return Job(io, cpu, adamw)


def fetch_job(unit: Unit, home: str, cal: Calibration, dtype: torch.dtype) -> Job:
    """Copy a unit's weights from its home tier to the device (NVMe: through staging)."""
    if home == "device":
        return Job()
    nbytes = working_bytes(unit, dtype)
    io = nbytes / cal.h2d_bps
    if home == "nvme":
        io += nbytes / cal.nvme_read_bps
    return Job(io, 0.0)


def drain_job(unit: Unit, home: str, cal: Calibration, dtype: torch.dtype) -> Job:
    """Move a unit's fresh gradients to its home tier as fp32 (norm, copy, NVMe write)."""
    t = unit.trainable_numel
    if t == 0:
        return Job()
    fp32 = 4 * t
    cpu = 1.5 * fp32 / cal.memcpy_bps  # the norm reads it, the copy reads and writes it
    if dtype != torch.float32:
        cpu += fp32 / cal.memcpy_bps
    if home == "device":
        return Job(0.0, cpu if cal.device == "cpu" else 0.0)
    io = fp32 / cal.d2h_bps if cal.device != "cpu" else 0.0
    if home == "nvme":
        io += fp32 / cal.nvme_write_bps
    return Job(io, cpu)


def _cached_after_forward(units, homes, size, placement, dtype, capacity, buffer_bytes) -> list[bool]:
    """Which streamed units are still on the device when backward starts (LRU keeps the last)."""
    if capacity is None:
        return [True] * len(units)
    room = capacity - buffer_bytes - placement.tier_bytes["device"] - grads_in_flight(units, dtype)
    cached = [False] * len(units)
    for i in reversed(range(len(units))):
        if homes[i] == "device":
            continue
        if size[i] > room:
            break
        room -= size[i]
        cached[i] = True
    return cached


def _window(size: list[int], prefetch_bytes: int) -> list[int]:
    """For each unit, how many units earlier its prefetch is issued (0: on demand)."""
    ahead = []
    for i in range(len(size)):
        used, m = 0, 0
        while i - m >= 0 and used + size[i - m] <= prefetch_bytes and m < i:
            used += size[i - m]
            m += 1
        ahead.append(m)
    return ahead


def _pipeline(compute: list[float], jobs: list[Job], ahead: list[int], with_ends: bool = False):
    """Compute of unit i waits for job i; the transfer thread runs jobs in order, job i once
    the compute of unit i-ahead[i] has started. Returns (end, stall[, compute end per unit])."""
    t_job = t_comp = stall = 0.0
    starts, ends = [], []
    for i, (c, job) in enumerate(zip(compute, jobs)):
        gate = starts[i - ahead[i]] if ahead[i] else t_comp
        if job.seconds:
            t_job = max(t_job, gate) + job.seconds
            stall += max(0.0, t_job - t_comp)
            t_comp = max(t_comp, t_job)
        starts.append(t_comp)
        t_comp += c
        ends.append(t_comp)
    return (t_comp, stall, ends) if with_ends else (t_comp, stall)


def _drain(ready: list[float], jobs: list[Job]) -> float:
    """The drain thread takes each unit's gradients once its backward compute ended."""
    t = 0.0
    for at, job in zip(ready, jobs):
        t = max(t, at) + job.seconds
    return t


def _bottleneck(step_s, stall, fwd_stall, updates, transfer_s, optimizer_s) -> str:
    """'compute' unless waiting on data is a tenth of the step; then the larger cause."""
    if stall < 0.1 * step_s:
        return "compute"
    io = sum(j.io_s for j in updates)
    adam = sum(j.adamw_s for j in updates)
    if fwd_stall >= stall / 2 and adam > io:
        return "optimizer"
    return "transfer" if transfer_s >= optimizer_s or io >= adam else "optimizer"


# ---- the whole prediction ---------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    """Everything `tierflow plan` reports for one model, configuration and batch."""

    units: list
    placement: Placement
    compute_dtype: torch.dtype
    table: dict
    peaks: dict
    step: StepPrediction
    work: Workload


def predict(model: torch.nn.Module, cfg, cal: Calibration, batch_size: int = 1, seq_len: int = 256,
            placement: str = "auto") -> Prediction:
    """Partition `model` (meta or real) as the engine would, place it and predict the step.

    Raises BudgetError / ConfigError when it does not fit, as `tierflow.offload` would."""
    from .engine import _default_unit_bytes, _model_dtype
    from .layout import partition
    from .plan import _device_capacity, plan_placement

    dtype = cfg.dtype or _model_dtype(model)
    units, _ = partition(model, cfg.unit_bytes or _default_unit_bytes(cfg, model), allow_meta=True)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    plan = plan_placement(units, cfg, dtype, buffers, placement)
    capacity = _device_capacity(cfg)
    work = workload(model, units, batch_size, seq_len, dtype)
    return Prediction(units, plan, dtype, class_bytes(units, plan, dtype, buffers, work.activation_bytes),
                      peak_bytes(units, plan, dtype, buffers, capacity),
                      predict_step(units, plan, work, cal, dtype, capacity, buffers), work)
