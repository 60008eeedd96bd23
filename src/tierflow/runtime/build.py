"""Building an engine: one planning pass, then the state in its tiers.

`plan_model` cuts the model into units and places them (core/planner.py), putting linear
layers too big for the device budget in tiles and planning again when needed; nothing is
allocated yet. The other functions then allocate what the plan says. A failure at any point
leaves the model as it was (tiles undone, original parameters kept until every unit is in
place).
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field

import torch
from torch import nn

from tierflow.config import OffloadConfig
from tierflow.core import figures
from tierflow.core.cost import DEFAULT_BATCH_SHAPE, workload
from tierflow.core.layout import Unit, checked_source, partition
from tierflow.core.plan import DRAIN_BUFFERS, Placement, device_capacity
from tierflow.core.planner import choose_placement
from tierflow.core.tiling import tile_oversized
from tierflow.errors import BudgetError
from tierflow.memory.budget import Budget
from tierflow.memory import packed
from tierflow.memory.nvme import NvmeStore
from tierflow.memory.pool import BufferPool
from tierflow.memory.tiers import FP32, StateIO, UnitState


@dataclass
class ModelPlan:
    """The units of a model, the modules to hook, where each unit lives, and the tiling."""

    units: list[Unit]
    hooked: dict
    placement: Placement
    tiled: dict = field(default_factory=dict)   # tiled linear layer name -> tiles (tiling.py)
    untile: list = field(default_factory=list)  # (parent, name, original module) to undo it

    def restore(self) -> None:
        """A failed offload leaves the model as it was."""
        for parent, leaf, module in self.untile:
            setattr(parent, leaf, module)
        self.tiled, self.untile = {}, []


def plan_model(model: nn.Module, cfg: OffloadConfig, compute_dtype: torch.dtype, buffer_bytes: int,
               unit_bytes: int, world: int, placement="auto", from_source: bool = False) -> ModelPlan:
    """Partition and place; a linear layer too big for the device is tiled and planning redone."""
    try:
        return _partition_and_place(model, cfg, compute_dtype, buffer_bytes, unit_bytes, world, placement,
                                    from_source)
    except BudgetError:
        cap = device_capacity(cfg)
        if cap is None or from_source:  # a `source` reads parameters by their (untiled) names
            raise
        tiled, untile = tile_oversized(model, cap // 4, unit_bytes, compute_dtype)
        if not tiled:
            raise
    try:
        plan = _partition_and_place(model, cfg, compute_dtype, buffer_bytes, unit_bytes, world, placement,
                                    from_source)
    except BaseException:
        ModelPlan([], {}, None, tiled, untile).restore()
        raise
    plan.tiled, plan.untile = tiled, untile
    return plan


def _partition_and_place(model, cfg, compute_dtype, buffer_bytes, unit_bytes, world, placement, from_source):
    units, hooked = partition(model, unit_bytes, allow_meta=from_source, world_size=world, weights=cfg.weights)
    load = workload(model, units, *(cfg.batch_shape or DEFAULT_BATCH_SHAPE), compute_dtype)
    figs = figures.for_planning(cfg.device.type, compute_dtype)
    chosen = choose_placement(units, cfg, compute_dtype, buffer_bytes, load, figs, placement, world)[0]
    return ModelPlan(units, hooked, chosen)


def make_budgets(cfg: OffloadConfig, events) -> dict[str, Budget]:
    budgets = {"device": Budget("device", device_capacity(cfg)), "host": Budget("host", cfg.host_memory)}
    for budget in budgets.values():
        budget.listener = events.budget_changed
    return budgets


def replace_meta_parameters(model: nn.Module, placeholder: torch.Tensor) -> None:
    """Meta parameters cannot take real data: swap in placeholder parameters (same shape,
    same requires_grad; tied parameters stay tied)."""
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None or param.device.type != "meta":
                continue
            if id(param) not in replaced:
                replaced[id(param)] = nn.Parameter(placeholder.expand(param.shape), requires_grad=param.requires_grad)
            module._parameters[name] = replaced[id(param)]


def open_nvme(cfg: OffloadConfig, placement: Placement) -> NvmeStore | None:
    """The engine's spill file, or None when no state goes to NVMe."""
    if not placement.uses_nvme:
        if cfg.activations is not None and cfg.nvme is not None:
            # Activations may spill there: an unusable directory must fail now, before the
            # model's parameters move into the tiers, not after (the model would be lost).
            NvmeStore(cfg.nvme, io_threads=1, direct=cfg.direct_io,
                      file_name=f"tierflow-probe-{os.getpid()}-{secrets.token_hex(4)}.bin").close()
        return None
    # One spill file per engine: engines sharing a directory never touch each other's state.
    name = f"tierflow-spill-{os.getpid()}-{secrets.token_hex(4)}.bin"
    store = NvmeStore(cfg.nvme, io_threads=cfg.io_threads, direct=cfg.direct_io, file_name=name)
    try:
        store.check_space(placement.tier_bytes["nvme"])
    except BaseException:
        store.close()
        raise
    return store


def make_pools(cfg: OffloadConfig, placement: Placement, budgets: dict, nvme, pin: bool):
    """Staging buffers for the transfer thread and for the drain thread (NVMe only)."""
    if nvme is None:
        return None, None
    budgets["host"].reserve(placement.staging_bytes, "the NVMe staging buffers")
    return (BufferPool(cfg.staging_buffers, cfg.chunk_bytes, pin=pin),
            BufferPool(DRAIN_BUFFERS, cfg.chunk_bytes, pin=pin))


def move_buffers(model: nn.Module, budgets: dict, device: torch.device, buffer_bytes: int) -> list:
    """Buffers are small: they live on the device for good. Returns (module, name, original)
    for each buffer moved, for restore_buffers."""
    budgets["device"].reserve(buffer_bytes, "the model's buffers")
    moved = []
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                moved.append((module, name, buf))
                module._buffers[name] = buf.to(device)
    return moved


def restore_buffers(moved: list) -> None:
    """Undo move_buffers (a failed setup)."""
    for module, name, buf in moved:
        module._buffers[name] = buf


def load_state(units: list[Unit], homes, io: StateIO, compute_dtype: torch.dtype, dist, source) -> list[UnitState]:
    """Copy each parameter (or its value from `source`) into its unit's home tier. The
    originals are left in place (the caller detaches them once every unit is in place), so a
    failure (disk full...) loses nothing."""
    states = []
    for unit, home in zip(units, homes):
        shard = dist.shard(unit.numel) if dist else None
        state = io.allocate(unit, home, compute_dtype, shard)
        states.append(state)
        for index, slot in enumerate(unit.slots):
            data = slot.param.detach() if source is None else checked_source(source(slot.name), slot)
            if packed.ARRAY in state.arrays:  # compressed as it streams in, one parameter at a time
                packed.write_slot(io, state, unit, index, data, compute_dtype)
                continue
            data = data.reshape(-1)
            if "master" in state.arrays:
                io.write_from(state, "master", data.to(FP32), slot.offset)
            if "weights" in state.arrays:
                io.write_from(state, "weights", data.to(compute_dtype), slot.offset)
    # Device-homed arrays were written on the compute stream; a compressed one is next read by
    # a fetch on the copy lane, which waits for no compute event: let the writes finish (once).
    io.device.synchronize_lane()
    return states
