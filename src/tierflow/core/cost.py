"""The cost model: bytes per tensor class and tier, peak memory per tier, and step time.

Pure arithmetic over unit sizes, a `plan.Placement` and measured machine figures
(`Calibration`, from `tierflow bench calibrate`); nothing here touches a device, so
`tierflow plan` can answer before any memory is allocated.

Step time follows what the engine does in one step (see runtime/passes.py, runtime/residency.py):

* forward: the transfer thread runs, unit by unit in model order, the lazy AdamW
  update of each unit (reading master, gradient and moments from its home tier,
  writing master and moments back) and copies the new weights to the device; the
  compute of unit i waits for its job, and job i may start only once it enters
  the prefetch window (`prefetch_bytes` ahead of the compute);
* backward: units evicted from a bounded device budget are fetched again (same
  pipeline, reverse order); a drain thread writes each unit's gradients to its
  home tier as they appear, and the step waits for the last one.

Each job is I/O (NVMe; the host<->device link of a GPU) and CPU work (AdamW,
memory copies). On a CPU device, compute and that CPU work share the cores: while
both run, each loses the measured fraction (`Calibration.contention`) of its speed,
and I/O slows down beside compute too. Compute time is FLOPs over the measured rate
of a reference model, plus the engine's measured bookkeeping per unit. `simulate`
plays a phase event by event with these rules.

With N data-parallel ranks (`world_size`, distributed.py) each rank keeps 1/N of
every unit's state, updates and fetches only that shard, and per step moves over
the network (ring collectives, per rank): the weights all-gathered twice (forward
and backward; the engine gathers on the compute thread, so this time adds to the
compute of the unit) and the fp32 gradients reduce-scattered once (on the drain
thread, beside backward). `collective_bytes` and `collective_seconds` give that traffic.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tierflow.core.figures import Calibration
from tierflow.core.layout import ALIGN, ARRAY_CLASS, Unit, array_specs, stored_grad_bytes
from tierflow.core.plan import TIERS, Placement, working_bytes

CLASSES = ("weights", "master", "grads", "moments", "activations", "buffers", "working", "staging")
ADAMW_READ, ADAMW_WRITE = 16, 12  # fp32 bytes per parameter an AdamW step reads / writes
DEFAULT_BATCH_SHAPE = (1, 256)  # (batch, sequence) the planner assumes when not told: `tierflow plan`'s default
LINK_LATENCY_S = 10e-6  # per hop of a ring collective (NCCL over InfiniBand/NVLink: a few microseconds)


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
    collective_s: float = 0.0  # all-gathers and reduce-scatters of data-parallel ranks (alone)


@dataclass(frozen=True)
class Job:
    """Work of one thread for one unit: (kind, seconds) parts in order; kind 'io' (disk, or the
    host<->device link of a GPU: no CPU), 'cpu' (memory copies) or 'adamw' (the optimizer)."""

    parts: tuple = ()

    def seconds(self, kind: str | None = None) -> float:
        return sum(s for k, s in self.parts if kind is None or k == kind)


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
                buffer_bytes: int, activation_bytes: int = 0, world_size: int = 1) -> dict[str, dict[str, int]]:
    """tier -> tensor class -> bytes the plan puts there (NVMe: extents, 4 KiB rounded); with
    several ranks, what rank 0 (the largest share of trainable state) holds."""
    table = {tier: dict.fromkeys(CLASSES, 0) for tier in TIERS}
    for unit, home in zip(units, placement.homes):
        for name, (numel, dtype) in array_specs(shard_unit(unit, world_size), compute_dtype).items():
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
    """Bytes of the weights of every unit fetched into device buffers (not computed in place)."""
    return sum(working_bytes(u, compute_dtype) for i, u in enumerate(units) if not placement.stays(i))


def grads_in_flight(units: list[Unit], compute_dtype: torch.dtype) -> int:
    """Gradient bytes waiting on the device for the drain thread: the largest parameter's (the
    drain thread writes each gradient out while autograd computes the next one)."""
    return max((s.numel * compute_dtype.itemsize for u in units for s in u.slots if s.trainable), default=0)


def peak_bytes(units: list[Unit], placement: Placement, compute_dtype: torch.dtype, buffer_bytes: int,
               device_capacity: int | None, world_size: int = 1) -> dict[str, int]:
    """Peak accounted bytes per tier (what `engine.budget_peaks()` reports; NVMe: file size).

    Device: buffers and device-resident state for good, plus the weights fetched in a step
    (cached until opt.step() or until the budget needs the room) and gradients in flight."""
    state = class_bytes(units, placement, compute_dtype, buffer_bytes, world_size=world_size)
    resident = buffer_bytes + placement.tier_bytes["device"]
    streamed = streamed_bytes(units, placement, compute_dtype)
    if world_size > 1:  # a rank's device-resident state is a shard: every unit is gathered
        streamed = sum(working_bytes(u, compute_dtype) for u in units)
    moving = streamed + grads_in_flight(units, compute_dtype)
    if device_capacity is not None:
        moving = min(moving, max(0, device_capacity - resident))
    nvme = sum(v for k, v in state["nvme"].items())
    return {"device": resident + moving, "host": placement.tier_bytes["host"] + placement.staging_bytes,
            "nvme": nvme}


def shard_unit(unit: Unit, world_size: int) -> Unit:
    """The part of `unit` one rank keeps (rank 0: the largest share of the trainable prefix)."""
    if world_size <= 1:
        return unit
    numel = unit.numel // world_size
    return replace(unit, numel=numel, trainable_numel=min(unit.trainable_numel, numel))


def collective_bytes(units: list[Unit], compute_dtype: torch.dtype, world_size: int) -> dict[str, int]:
    """Bytes each rank sends (and receives) per step in ring collectives: all-gathers of the
    weights in forward and backward, one reduce-scatter of the fp32 gradients."""
    if world_size <= 1:
        return {"all_gather": 0, "reduce_scatter": 0}
    share = (world_size - 1) / world_size
    weights = sum(working_bytes(u, compute_dtype) for u in units)
    grads = sum(4 * u.numel for u in units if u.trainable_numel)
    return {"all_gather": int(2 * share * weights), "reduce_scatter": int(share * grads)}


def collective_seconds(nbytes: float, world_size: int, link_bps: float) -> float:
    """One ring collective moving `nbytes` per rank: bandwidth term plus a latency per hop."""
    if world_size <= 1:
        return 0.0
    return nbytes / link_bps + (world_size - 1) * LINK_LATENCY_S


# ---- time -------------------------------------------------------------------------------

def predict_step(units: list[Unit], placement: Placement, work: Workload, cal: Calibration,
                 compute_dtype: torch.dtype, device_capacity: int | None, buffer_bytes: int = 0,
                 world_size: int = 1, link_bps: float = 25e9) -> StepPrediction:
    """Predicted time of one training step (forward, backward, optimizer) in steady state; with
    `world_size` ranks joined by links of `link_bps` bytes/s, of one rank."""
    fwd_rate, bwd_rate = cal.block_rate(work.width)
    homes, n = placement.homes, len(units)
    stays = [placement.stays(i) for i in range(n)]
    overhead = [cal.unit_overhead_s[0 if s else 1] / 2 for s in stays]  # main-thread bookkeeping
    fwd = [f / fwd_rate + o for f, o in zip(work.unit_flops, overhead)]
    bwd = [2 * f / bwd_rate + o for f, o in zip(work.unit_flops, overhead)]
    fixed = cal.block_fixed(work.width)  # embedding, head, loss: with the last unit (the head)
    fwd[-1], bwd[-1] = fwd[-1] + fixed[0], bwd[-1] + fixed[1]
    size = [working_bytes(u, compute_dtype) for u in units]
    full, units = units, [shard_unit(u, world_size) for u in units]  # each rank updates its shard
    share_of = (world_size - 1) / max(world_size, 1)
    gathers = [collective_seconds(share_of * s, world_size, link_bps) for s in size]
    fwd = [f + g for f, g in zip(fwd, gathers)]  # gathered on the compute thread at first use
    bwd = [b + g for b, g in zip(bwd, gathers)]
    on_gpu = placement.device_updates or (False,) * n
    updates = [update_job(u, h, cal, compute_dtype, d, s) for u, h, d, s in zip(units, homes, on_gpu, stays)]
    cached = _cached_after_forward(units, stays, size, placement, compute_dtype, device_capacity, buffer_bytes)
    refetch = [Job() if s or c else fetch_job(u, h, cal, compute_dtype) for u, h, s, c in zip(units, homes, stays, cached)]
    # On a CPU the units that never move take no room in the prefetch window (residency.prefetch).
    window_size = [0 if s and cal.device == "cpu" else b for s, b in zip(stays, size)]
    drains = [drain_job(u, h, cal, compute_dtype) for u, h in zip(units, homes)]
    scatters = [collective_seconds(share_of * 4 * u.numel, world_size, link_bps) if u.trainable_numel else 0.0
                for u in full]
    drains = [Job((("io", s),) + d.parts) if s else d for d, s in zip(drains, scatters)]
    share = cal.contention  # what compute, CPU work and I/O lose while they run together
    fwd_s, fwd_waits = simulate(fwd, updates, _window(window_size, placement.prefetch_bytes), share)
    back = list(reversed(range(n)))
    bwd_s, bwd_waits = simulate([bwd[i] for i in back], [refetch[i] for i in back],
                                _window([window_size[i] for i in back], placement.prefetch_bytes), share,
                                [drains[i] for i in back])
    jobs = updates + refetch + drains
    optimizer_s = sum(j.seconds("adamw") for j in jobs)
    step_s = fwd_s + bwd_s
    waits = {k: fwd_waits[k] + bwd_waits[k] for k in fwd_waits}
    collective_s = 2 * sum(gathers) + sum(scatters)
    return StepPrediction(step_s, sum(fwd) + sum(bwd) - 2 * sum(gathers),
                          sum(j.seconds() for j in jobs) - optimizer_s - sum(scatters), optimizer_s, fwd_s, bwd_s,
                          _bottleneck(step_s, waits), collective_s)


def update_job(unit: Unit, home: str, cal: Calibration, dtype: torch.dtype, on_device: bool = False,
               in_place: bool = False) -> Job:
    """The forward job of a unit after opt.step(): AdamW in its home tier (NVMe: read, update,
    write back), then its weights to the device (fused when every parameter is trainable).
    `on_device` (a host- or NVMe-homed unit on a GPU, `Placement.device_updates`): the state
    crosses the link to the GPU's AdamW and back instead, and the new weights stay there.
    `in_place`: the unit is computed in its home (`Placement.stays`): nothing is copied."""
    t = unit.trainable_numel
    if t == 0:
        return fetch_job(unit, home, cal, dtype, in_place)
    parts = []
    read = ADAMW_READ - 4 + stored_grad_bytes(home, dtype)  # bytes per parameter AdamW reads
    if home == "nvme":
        parts.append(("io", t * read / cal.nvme_read_bps))
    if on_device and home != "device" and cal.device != "cpu":
        back = ADAMW_WRITE + (dtype.itemsize if dtype != torch.float32 else 0)  # + host copy of the weights
        # Uploads and downloads overlap (updates.DeviceAdamW uses both directions of the link).
        parts.append(("io", max(t * read / cal.h2d_bps, t * back / cal.d2h_bps) + t / cal.device_adamw_params_per_s))
        if home == "nvme":
            parts.append(("io", t * back / cal.nvme_write_bps))
        job = Job(tuple(parts))
        return job if t == unit.numel else Job(job.parts + fetch_job(unit, home, cal, dtype).parts)
    on_gpu = home == "device" and cal.device != "cpu"  # a GPU updates its own state: no host CPU
    rate = cal.device_adamw_params_per_s if on_gpu else cal.adamw_params_per_s
    parts.append(("io" if on_gpu else "adamw", t / rate))
    if dtype != torch.float32:  # compute-dtype weights rewritten from the new masters
        parts.append(("io" if on_gpu else "cpu", t * dtype.itemsize / cal.memcpy_bps))
    if home == "nvme":
        parts.append(("io", (t * ADAMW_WRITE + (t * dtype.itemsize if dtype != torch.float32 else 0))
                      / cal.nvme_write_bps))
    job = Job(tuple(parts))
    if home == "device" or in_place:
        return job
    if t == unit.numel:
        return Job(job.parts + (_to_device(working_bytes(unit, dtype), cal),))
    return Job(job.parts + fetch_job(unit, home, cal, dtype).parts)


def fetch_job(unit: Unit, home: str, cal: Calibration, dtype: torch.dtype, in_place: bool = False) -> Job:
    """Copy a unit's weights from its home tier to the device (NVMe: through staging); nothing
    for a unit computed in place."""
    if home == "device" or in_place:
        return Job()
    nbytes = working_bytes(unit, dtype)
    read = (("io", nbytes / cal.nvme_read_bps),) if home == "nvme" else ()
    return Job(read + (_to_device(nbytes, cal),))


def drain_job(unit: Unit, home: str, cal: Calibration, dtype: torch.dtype) -> Job:
    """Move a unit's fresh gradients to its home tier (norm, copy, NVMe write)."""
    fp32 = 4 * unit.trainable_numel
    if fp32 == 0:
        return Job()
    if home == "device" and cal.device != "cpu":
        return Job((("io", fp32 / cal.drain_bps),))  # on the GPU: small next to compute
    stored = stored_grad_bytes(home, dtype) * unit.trainable_numel
    if cal.device != "cpu":  # normed on the GPU, copied straight into its pinned array
        parts = [("io", stored / cal.d2h_bps)]
    else:
        widened = dtype != torch.float32 and stored == fp32  # converted to fp32 on the way
        parts = [("cpu", fp32 / cal.drain_bps + (fp32 / cal.memcpy_bps if widened else 0.0))]
    if home == "nvme":
        parts.append(("io", stored / cal.nvme_write_bps))
    return Job(tuple(parts))


def _to_device(nbytes: int, cal: Calibration) -> tuple[str, float]:
    """Copying into a fresh device buffer: CPU work on a CPU device, the link on a GPU."""
    return ("cpu" if cal.device == "cpu" else "io", nbytes / cal.h2d_bps)


def _cached_after_forward(units, stays, size, placement, dtype, capacity, buffer_bytes) -> list[bool]:
    """Which streamed units are still on the device when backward starts (LRU keeps the last)."""
    if capacity is None:
        return [True] * len(units)
    room = capacity - buffer_bytes - placement.tier_bytes["device"] - grads_in_flight(units, dtype)
    cached = [False] * len(units)
    for i in reversed(range(len(units))):
        if stays[i]:
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
        while m < i and used + size[i - m] <= prefetch_bytes:
            used += size[i - m]
            m += 1
        ahead.append(m)
    return ahead


def simulate(compute: list[float], jobs: list[Job], ahead: list[int], share=(0.0, 0.0), drains=None):
    """One phase, event by event: the compute of unit i waits for transfer job i; the transfer
    thread runs jobs in order, job i once the compute of unit i-ahead[i] has started (0: once
    unit i is next); the drain thread takes unit i's job once its compute is done. `share`: the
    fractions of speed that compute loses beside CPU work ('cpu', 'adamw' parts), and that CPU
    work and I/O lose beside compute. Returns (seconds, compute idle time per kind it waited on)."""
    n = len(compute)
    lose_compute, lose_cpu, lose_io = (min(x, 0.95) for x in (tuple(share) + (0.0,))[:3])
    t, ci, c_left, starts, done = 0.0, 0, None, [], []
    lanes = {"xfer": [0, None, jobs], "drain": [0, None, drains or [Job()] * n]}  # next job, parts left
    waits = {"io": 0.0, "cpu": 0.0, "adamw": 0.0}
    while ci < n or lanes["drain"][0] < n:
        _start_jobs(lanes, ci, starts, done, ahead, n)
        if c_left is None and ci < n and lanes["xfer"][0] > ci:
            starts.append(t)
            c_left = compute[ci]
            _start_jobs(lanes, ci, starts, done, ahead, n)  # prefetches issued as unit ci starts
        active = [lane[1][0] for lane in lanes.values() if lane[1]]
        cpu_busy = any(kind != "io" for kind, _ in active)
        rate_c = 1 - lose_compute if cpu_busy else 1.0
        beside = c_left is not None  # compute running: CPU work and I/O slow down
        rate = {kind: 1 - (lose_io if kind == "io" else lose_cpu) if beside else 1.0 for kind, _ in active}
        steps = [left / rate[kind] for kind, left in active] + ([c_left / rate_c] if c_left is not None else [])
        if not steps:
            break
        dt = max(0.0, min(steps))
        if c_left is None and ci < n:
            waits[active[0][0] if active else "io"] += dt
        for lane in lanes.values():
            if lane[1]:
                kind, left = lane[1][0]
                lane[1][0] = (kind, left - dt * rate[kind])
        if c_left is not None:
            c_left -= dt * rate_c
        t += dt
        _finish_parts(lanes)
        if c_left is not None and c_left <= 1e-12:
            done.append(t)
            ci, c_left = ci + 1, None
    return t, waits


def _start_jobs(lanes, ci, starts, done, ahead, n) -> None:
    """Give the transfer and drain threads their next job when it may start."""
    xfer, drain = lanes["xfer"], lanes["drain"]
    while xfer[1] is None and xfer[0] < n:
        j = xfer[0]
        if not (ci >= j or (ahead[j] and len(starts) > j - ahead[j])):
            break
        xfer[1] = [p for p in xfer[2][j].parts if p[1] > 0] or None
        if xfer[1] is None:
            xfer[0] += 1
    while drain[1] is None and drain[0] < len(done):
        drain[1] = [p for p in drain[2][drain[0]].parts if p[1] > 0] or None
        if drain[1] is None:
            drain[0] += 1


def _finish_parts(lanes) -> None:
    for lane in lanes.values():
        while lane[1] and lane[1][0][1] <= 1e-12:
            lane[1].pop(0)
        if lane[1] is not None and not lane[1]:
            lane[0], lane[1] = lane[0] + 1, None


def _bottleneck(step_s: float, waits: dict) -> str:
    """'compute' unless the compute waits for data a tenth of the step; then the main cause."""
    if sum(waits.values()) < 0.1 * step_s:
        return "compute"
    return "optimizer" if waits["adamw"] > waits["io"] + waits["cpu"] else "transfer"


# ---- the whole prediction ---------------------------------------------------------------
