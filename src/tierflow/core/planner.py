"""The planner: of a few ways to spend the budgets, the one with the least predicted step time.

`plan.py` turns the budgets into a placement for one `Variant` (which units claim the
faster tiers first, how much device room holds state rather than caching streamed
weights, how wide the prefetch window is); `cost.py` predicts the step time of a
placement from measured machine figures. The planner predicts every variant that fits
and keeps the fastest. The plain nearest-tier plan (`GREEDY`) stays unless another is
predicted at least `MIN_GAIN` faster: smaller differences are inside the model's error,
and the simplest plan is the easiest to reason about.

On a GPU the planner also chooses, per unit, where AdamW of host- or NVMe-homed state runs:
on the CPU, or on the GPU (state copied over the link and back) where that is predicted
faster ("Deep Optimizer States"-style; `update_sites`).

The engine plans with this machine's cached calibration (`tierflow bench calibrate`) or,
before there is one, with `figures.nominal` figures; `tierflow plan` with the same
calibration shows the same placement.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tierflow.core.figures import Calibration
from tierflow.core.cost import (StepPrediction, Workload, class_bytes, collective_bytes, peak_bytes, predict_step,
                                update_job, workload)
from tierflow.core.layout import Unit, default_unit_bytes, model_dtype, partition
from tierflow.errors import BudgetError
from tierflow.core.plan import GREEDY, Placement, Variant, device_capacity, plan_placement

VARIANTS = tuple(Variant(order, share, scale) for order in ("front", "dense", "spread")
                 for share in (1.0, 0.5) for scale in (1.0, 2.0, 4.0))
MIN_GAIN = 0.03  # a variant must be predicted this much faster than the nearest-tier plan


def choose_placement(units: list[Unit], cfg, compute_dtype: torch.dtype, buffer_bytes: int, work: Workload,
                     cal: Calibration, placement: str = "auto", world_size: int = 1,
                     link_bps: float = 25e9) -> tuple[Placement, StepPrediction]:
    """The placement to use and its predicted step; raises BudgetError/ConfigError when even the
    nearest-tier plan does not fit (with the message that says what is short). `placement`:
    "auto" (searched), "greedy", a tier (everything there) or a `Variant` (used as given)."""
    capacity = device_capacity(cfg)

    def candidate(variant: Variant, where: str = "auto") -> tuple[Placement, StepPrediction]:
        plan = plan_placement(units, cfg, compute_dtype, buffer_bytes, where, world_size, variant)
        plan = replace(plan, device_updates=update_sites(units, plan, cfg, cal, compute_dtype))
        return plan, predict_step(units, plan, work, cal, compute_dtype, capacity, buffer_bytes, world_size, link_bps)

    if isinstance(placement, Variant):  # spent exactly as the caller says
        return candidate(placement)
    best = greedy_best = candidate(GREEDY, placement)
    if placement != "auto" or not has_choice(greedy_best[0], capacity):
        return best
    for variant in VARIANTS:
        if variant == GREEDY:
            continue
        try:
            plan, step = candidate(variant)
        except BudgetError:
            continue
        if step.step_s < best[1].step_s:
            best = (plan, step)
    if best[1].step_s > (1 - MIN_GAIN) * greedy_best[1].step_s:
        return greedy_best
    return best


def update_sites(units: list[Unit], plan: Placement, cfg, cal: Calibration, compute_dtype: torch.dtype) -> tuple:
    """Per unit, whether AdamW of its host- or NVMe-homed state runs on the GPU: always
    (`update_on="device"`), never (`"cpu"`, and on a CPU device), or with `"auto"`:

    * host-homed units are shared between the CPU and the GPU so that both finish together:
      the engine runs the two kinds at the same time (CPU updates on their own thread,
      `residency.Residency`), so each unit goes where the predicted total so far plus its
      own time is smaller ("Deep Optimizer States": interleaved CPU and GPU updates);
    * NVMe-homed units (updated on the transfer thread) go where each alone is faster.

    The engine still runs a GPU-side update on the CPU when the device has no free room for
    the scratch buffers at that moment."""
    if cfg.device.type == "cpu" or cfg.update_on == "cpu":
        return ()
    sites = [False] * len(units)
    totals = {"gpu": 0.0, "cpu": 0.0}
    for uid, (unit, home) in enumerate(zip(units, plan.homes)):
        if home == "device" or not unit.trainable_numel:
            continue
        if cfg.update_on == "device":
            sites[uid] = True
            continue
        gpu = update_job(unit, home, cal, compute_dtype, on_device=True).seconds()
        cpu = update_job(unit, home, cal, compute_dtype).seconds()
        if home == "nvme":
            sites[uid] = gpu < cpu
        elif totals["gpu"] + gpu <= totals["cpu"] + cpu:
            sites[uid], totals["gpu"] = True, totals["gpu"] + gpu
        else:
            totals["cpu"] += cpu
    return tuple(sites) if any(sites) else ()


def has_choice(plan: Placement, capacity: int | None) -> bool:
    """False when every variant gives the same plan: nothing limits the device."""
    return capacity is not None or set(plan.homes) != {"device"}


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
    world_size: int = 1
    collectives: dict | None = None  # collective_bytes: per rank per step


def predict(model: torch.nn.Module, cfg, cal: Calibration, batch_size: int = 1, seq_len: int = 256,
            placement: str = "auto", world_size: int = 1, link_bps: float = 25e9) -> Prediction:
    """Partition `model` (meta or real) as the engine would, place it and predict the step
    (of one of `world_size` data-parallel ranks, `batch_size` sequences each).

    Raises BudgetError / ConfigError when it does not fit, as `tierflow.offload` would."""
    dtype = cfg.dtype or model_dtype(model)
    units, _ = partition(model, cfg.unit_bytes or default_unit_bytes(cfg, model), allow_meta=True,
                         world_size=world_size, weights=cfg.weights)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    work = workload(model, units, batch_size, seq_len, dtype)
    plan, step = choose_placement(units, cfg, dtype, buffers, work, cal, placement, world_size, link_bps)
    return Prediction(units, plan, dtype,
                      class_bytes(units, plan, dtype, buffers, work.activation_bytes, world_size),
                      peak_bytes(units, plan, dtype, buffers, device_capacity(cfg), world_size),
                      step, work, world_size, collective_bytes(units, dtype, world_size))
