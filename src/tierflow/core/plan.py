"""Placement: choose the home tier of every unit's state from the budgets.

Pure arithmetic over unit sizes; nothing is allocated here, so a plan that does
not fit fails with a message that says what is short before any work starts.

The device budget first holds a working set: buffers, the unit in use plus one
being fetched, the gradients of the largest unit, and the prefetch window.
Whatever remains holds whole units' state (the optimizer then runs where the
state is). The host budget first holds the NVMe staging buffers (when anything
spills), then whole units' state. The rest goes to NVMe.

A `Variant` says how to spend the budgets (which units claim the faster tiers
first, how much device room holds state rather than caching streamed weights,
how wide the prefetch window is); `planner.py` predicts the step time of a few
variants and keeps the fastest. `GREEDY` is the plain nearest-tier plan.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tierflow.config import OffloadConfig, format_size
from tierflow.errors import BudgetError, ConfigError
from tierflow.core.layout import Unit
from tierflow.core.layout import array_specs, stored_grad_bytes
from tierflow.core.quant import packed_nbytes

TIERS = ("device", "host", "nvme")
PLACEMENTS = ("auto", "greedy") + TIERS  # "auto": searched by the planner; a tier: everything there
DRAIN_BUFFERS = 2  # staging buffers reserved for gradient write-back


def state_bytes(unit: Unit, compute_dtype: torch.dtype, world_size: int = 1) -> int:
    """Bytes of all arrays a unit keeps in its home tier (per rank: the largest shard)."""
    shard = None
    if world_size > 1:  # rank 0's shard holds the most of the trainable prefix
        shard = _Shard(0, unit.numel // world_size)
    return sum(numel * dtype.itemsize for numel, dtype in array_specs(unit, compute_dtype, shard).values())


@dataclass(frozen=True)
class _Shard:
    lo: int
    hi: int


def working_bytes(unit: Unit, compute_dtype: torch.dtype) -> int:
    """Bytes of a unit's weights on the device while it is in use (a compressed unit's also
    count its compressed bytes, read to the device and dequantized there)."""
    packed = packed_nbytes(unit, compute_dtype) if unit.weights is not None else 0
    return unit.numel * compute_dtype.itemsize + packed


def grad_bytes(unit: Unit, compute_dtype: torch.dtype) -> int:
    """Bytes of a unit's gradients as autograd produces them on the device."""
    return sum(s.numel for s in unit.slots if s.trainable) * compute_dtype.itemsize


@dataclass(frozen=True)
class Variant:
    """One way to spend the budgets; the planner compares variants by predicted step time.

    Attributes:
        order: which units claim the faster tiers first: "front" (model order: the first
            units of a step, whose fetch nothing can hide), "dense" (the most bytes moved per
            step per byte kept: trainable before frozen units) or "spread" (the units left to
            slower tiers are spaced evenly through the model, so that each one's transfer
            hides behind the compute of the faster units between them).
        device_state: the share of the device room left after the working set that may hold
            state; the rest caches streamed weights from forward to backward.
        prefetch_scale: the prefetch window in multiples of the default (two largest units);
            ignored when the user set prefetch_bytes.
    """

    order: str = "front"
    device_state: float = 1.0
    prefetch_scale: float = 1.0


GREEDY = Variant()  # nearest tier first, in model order


@dataclass(frozen=True)
class Placement:
    """The plan: a home tier per unit and the memory set aside for moving data.

    Attributes:
        homes: home tier of each unit, indexed by unit id.
        device_working: device bytes reserved for weights in use, in flight and gradients.
        prefetch_bytes: part of `device_working` that prefetch may fill ahead of use.
        staging_bytes: host bytes of the NVMe staging buffers (0 when nothing spills).
        tier_bytes: state bytes placed in each tier.
        activation_bytes: device bytes kept free of state for activations (only when the
            engine manages them, `activations=`): half of what the working set leaves.
        variant: how the budgets were spent (see `Variant`).
        device_updates: per unit, whether its AdamW runs on the GPU although its state lives
            in host memory or on NVMe (copied over and back; `update_on`); empty: none does.
        in_place: per unit, whether it is computed where its state lives and never fetched
            (`computed_in_place`); empty: the device-homed units are.
    """

    homes: tuple[str, ...]
    device_working: int
    prefetch_bytes: int
    staging_bytes: int
    tier_bytes: dict
    activation_bytes: int = 0
    variant: Variant = GREEDY
    device_updates: tuple[bool, ...] = ()
    in_place: tuple[bool, ...] = ()

    @property
    def uses_nvme(self) -> bool:
        return "nvme" in self.homes

    def stays(self, uid: int) -> bool:
        """Whether unit `uid` is computed in its home, never fetched into a device buffer."""
        return self.in_place[uid] if self.in_place else self.homes[uid] == "device"


def computed_in_place(unit: Unit, home: str, cfg: OffloadConfig, world_size: int = 1) -> bool:
    """A unit whose weights the compute device reads where they live: device-homed state, and
    on a CPU host-homed state too (`OffloadConfig.host_in_place`). Not with several ranks (a
    rank holds only its shard: the weights are gathered) nor for compressed units (they are
    dequantized into a buffer at each use)."""
    if world_size > 1 or unit.weights is not None:
        return False
    return home == "device" or (home == "host" and cfg.host_in_place)


def check_placement(placement) -> None:
    """A placement by name must be one of PLACEMENTS (a `Variant` is checked by the planner)."""
    if isinstance(placement, str) and placement not in PLACEMENTS:
        raise ConfigError(f"unknown placement {placement!r}: use 'auto', 'greedy', 'device', 'host' or 'nvme'")


def plan_placement(units: list[Unit], cfg: OffloadConfig, compute_dtype: torch.dtype,
                   buffer_bytes: int, placement: str = "auto", world_size: int = 1,
                   variant: Variant = GREEDY) -> Placement:
    """Place every unit as `variant` says; raise BudgetError/ConfigError naming what is short."""
    check_placement(placement)
    if placement == "greedy":  # the nearest-tier plan, not searched (planner.py)
        placement, variant = "auto", GREEDY
    largest = max(units, key=lambda u: working_bytes(u, compute_dtype))
    need_working = (buffer_bytes + 2 * working_bytes(largest, compute_dtype)
                    + max(grad_bytes(u, compute_dtype) for u in units))
    device_cap = device_capacity(cfg)
    if device_cap is not None and device_cap < need_working:
        raise BudgetError(
            f"device_memory={format_size(device_cap)} is too small for even one layer: unit "
            f"'{largest.name}' ({largest.numel:,} elements) needs {format_size(need_working)} on the "
            f"device (weights in use and in flight, its gradients, buffers); raise device_memory to at "
            f"least {format_size(need_working)}, or pass a smaller unit_bytes")
    prefetch = cfg.prefetch_bytes
    if prefetch is None:
        prefetch = int(variant.prefetch_scale * 2 * working_bytes(largest, compute_dtype))
    manages_activations = cfg.activations is not None and device_cap is not None
    if device_cap is not None:
        # When the engine manages activations, prefetch may take at most half of the spare room:
        # the rest is theirs (with every placement, not only "auto").
        spare = device_cap - need_working
        prefetch = max(0, min(prefetch, spare // 2 if manages_activations else spare))
    device_working = need_working + prefetch

    staging = (cfg.staging_buffers + DRAIN_BUFFERS) * cfg.chunk_bytes
    activation_bytes = 0
    if manages_activations:
        # Without room, every activation would have to leave the device: keep half for them.
        activation_bytes = (device_cap - device_working) // 2
    homes, tier_bytes = _assign(units, cfg, compute_dtype, placement, device_cap,
                                device_working + activation_bytes, staging, world_size, variant)
    uses_nvme = "nvme" in homes
    if uses_nvme and cfg.host_memory is not None and cfg.host_memory < staging + tier_bytes["host"]:
        raise BudgetError(
            f"host_memory={format_size(cfg.host_memory)} cannot hold the NVMe staging buffers "
            f"({cfg.staging_buffers + DRAIN_BUFFERS} x {format_size(cfg.chunk_bytes)} = {format_size(staging)}): "
            f"raise host_memory, or pass a smaller chunk_bytes or fewer staging_buffers")
    in_place = tuple(computed_in_place(u, h, cfg, world_size) for u, h in zip(units, homes))
    return Placement(tuple(homes), device_working, prefetch, staging if uses_nvme else 0, tier_bytes,
                     activation_bytes, variant, in_place=in_place)


def device_capacity(cfg: OffloadConfig) -> int | None:
    """The device budget (`OffloadConfig.device_capacity`: the device is asked, not used)."""
    return cfg.device_capacity()


def traffic_bytes(unit: Unit, compute_dtype: torch.dtype) -> int:
    """Bytes one step moves for a unit that lives off the device: its weights in forward and
    again in backward and, per trainable parameter, AdamW's 16 B read and 12 B write of master,
    moments and gradient plus the 4 B gradient written back (a 2-byte compute dtype's gradient
    stays in it off the device, runtime/gradients.py: 2 B less each way)."""
    grad = stored_grad_bytes("host", compute_dtype)
    return 2 * working_bytes(unit, compute_dtype) + (24 + 2 * grad) * unit.trainable_numel


def claim_order(units: list[Unit], order: str, compute_dtype: torch.dtype = torch.float32) -> list[int]:
    """Unit ids in the order they claim the faster tiers (see `Variant.order`)."""
    n = len(units)
    if order == "front":
        return list(range(n))
    if order == "dense":  # most traffic per byte kept first: frozen units move far less than trainable ones
        density = [traffic_bytes(u, compute_dtype) / max(1, state_bytes(u, compute_dtype)) for u in units]
        return sorted(range(n), key=lambda i: (-round(density[i], 3), i))
    if order == "spread":  # golden-ratio sequence: any tail of it is spread evenly over the model
        return sorted(range(n), key=lambda i: (i * 0.6180339887498949) % 1.0)
    raise ConfigError(f"unknown claim order {order!r}: use 'front', 'dense' or 'spread'")


def _assign(units, cfg, compute_dtype, placement, device_cap, device_working, staging, world_size=1,
            variant: Variant = GREEDY):
    """Nearest tier first (device, then host, then NVMe), units in the variant's claim order."""
    room = {
        "device": None if device_cap is None else int((device_cap - device_working) * variant.device_state),
        "host": cfg.host_memory,
    }
    if cfg.nvme is not None and room["host"] is not None and placement in ("auto", "nvme"):
        room["host"] -= staging  # staging buffers exist as soon as one unit spills
    allowed = {"auto": TIERS, "device": ("device",), "host": ("host",), "nvme": ("nvme",)}[placement]
    if placement == "nvme" and cfg.nvme is None:
        raise ConfigError("placement='nvme' needs an NVMe directory: pass nvme=DIR")
    homes, tier_bytes, short = [None] * len(units), dict.fromkeys(TIERS, 0), 0
    for uid in claim_order(units, variant.order, compute_dtype):
        unit = units[uid]
        need = state_bytes(unit, compute_dtype, world_size)
        for tier in allowed:
            if tier == "nvme" and cfg.nvme is None:
                continue
            if tier != "nvme" and room[tier] is not None and room[tier] < need:
                continue
            if tier != "nvme" and room[tier] is not None:
                room[tier] -= need
            homes[uid] = tier
            tier_bytes[tier] += need
            break
        else:
            short += need
    if short:
        total = sum(state_bytes(u, compute_dtype) for u in units)
        where = " or ".join(allowed if placement != "auto" else ("host",))
        hint = "" if cfg.nvme is not None else ", or pass nvme=DIR to spill to disk"
        raise BudgetError(
            f"the training state ({format_size(total)}) does not fit: {format_size(short)} more is "
            f"needed in {where} memory; raise {'host' if where == 'host' else where}_memory by "
            f"{format_size(short)}{hint}")
    return homes, tier_bytes
