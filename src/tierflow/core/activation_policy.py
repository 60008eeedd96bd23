"""The `auto` activation policy: per layer, keep, offload or recompute, from measurements.

Pure arithmetic over what the first (measured) step saw, so it is testable alone.

Peak device bytes of activations, with forward then backward in reverse:
kept layers' saved bytes + recomputed layers' inputs + what is kept outside the
layers + a transient of two layers' worth (the layer being computed and the one
fetched back or recomputed ahead of it). Starting from every layer off the
device, layers are kept from the last one backwards (the first ones backward
needs, so no copy back would be waiting) while the peak fits the room. The rest
are offloaded when copying their bytes out and back is cheaper than running their
forward again and the host (or NVMe) has room; otherwise recomputed.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LayerStats:
    """What the measured step saw of one layer (summed over its calls)."""

    saved_bytes: int = 0     # bytes autograd saved inside the layer (not parameters)
    input_bytes: int = 0     # bytes of its tensor inputs (what recomputation keeps)
    seconds: float = 0.0     # forward time (what recomputation costs again)
    start: float = 0.0


@dataclass(frozen=True)
class Policy:
    """Mode of every layer ('keep', 'offload' or 'recompute') and of what is saved outside them
    ('keep' or 'offload')."""

    layers: tuple[str, ...]
    outside: str = "keep"


def peak_bytes(policy: Policy, stats: list[LayerStats], outside: LayerStats) -> int:
    """Estimated peak device bytes of activations under `policy` (see the module docstring)."""
    held = outside.saved_bytes if policy.outside == "keep" else 0
    for mode, s in zip(policy.layers, stats):
        held += s.saved_bytes if mode == "keep" else s.input_bytes if mode == "recompute" else 0
    return held + transient_bytes(stats)


def transient_bytes(stats: list[LayerStats]) -> int:
    return 2 * max((s.saved_bytes for s in stats), default=0)


def choose(stats: list[LayerStats], outside: LayerStats, device_room: float, offload_room: float,
           copy_rate: float) -> Policy:
    """The cheapest policy whose estimated peak fits `device_room` bytes.

    `offload_room`: bytes the host (or NVMe) can take; `copy_rate`: measured bytes/s of
    one device<->host copy."""
    keep_all = Policy(("keep",) * len(stats), "keep")
    if peak_bytes(keep_all, stats, outside) - transient_bytes(stats) <= device_room:
        return keep_all
    modes, offloaded = [], 0
    for s in stats:
        cheaper = 2 * s.saved_bytes / copy_rate <= s.seconds
        if cheaper and offloaded + s.saved_bytes <= offload_room:
            modes.append("offload")
            offloaded += s.saved_bytes
        else:
            modes.append("recompute")
    room = device_room - transient_bytes(stats)
    outside_mode = "keep"
    used = sum(s.input_bytes for m, s in zip(modes, stats) if m == "recompute")
    if used + outside.saved_bytes > room and offloaded + outside.saved_bytes <= offload_room:
        outside_mode = "offload"
    else:
        used += outside.saved_bytes
    for i in range(len(stats) - 1, -1, -1):
        s = stats[i]
        extra = s.saved_bytes - (s.input_bytes if modes[i] == "recompute" else 0)
        if used + extra <= room:
            modes[i] = "keep"
            used += extra
    return Policy(tuple(modes), outside_mode)
