"""Which parameters a tierflow engine holds, so that a model is never adopted twice.

An engine points the parameters of the units it streams at placeholders (one NaN element,
expanded) while their data lives in its tiers. A second engine over the same model would
copy those NaNs in as its initial weights and train from them without a word. So every
engine records the parameters it detaches here, and offload refuses a model with any of them.

Units computed where their state lives (device-homed ones; on a CPU host-homed ones too)
keep viewing real data: their parameters are not recorded. The recorded ones stay recorded
after close(), marked closed: their data went with the engine.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

from tierflow.errors import ConfigError


@dataclass
class Hold:
    """One engine's hold on its parameters."""

    closed: bool = False  # the engine was closed without giving the parameters back


_lock = threading.RLock()  # re-entrant: a weakref callback may run inside hold() (garbage collection)
# id(parameter) -> (weak reference to it, its Hold). Keyed by id, not by the tensor: tensors
# compare element-wise, so they cannot be keys of a WeakKeyDictionary or members of a WeakSet.
_held: dict[int, tuple[weakref.ref, Hold]] = {}


def hold(params, holder: Hold) -> None:
    """Record `params` as held by `holder` (an engine about to detach them)."""
    with _lock:
        for param in params:
            key = id(param)
            _held[key] = (weakref.ref(param, lambda ref, key=key: _forget(key, ref)), holder)


def release(params, holder: Hold) -> None:
    """`holder` gave `params` back (their data is real again)."""
    with _lock:
        for param in params:
            entry = _held.get(id(param))
            if entry is not None and entry[1] is holder:
                del _held[id(param)]


def _forget(key: int, ref: weakref.ref) -> None:
    """The parameter was garbage collected: its id may be reused by a new tensor."""
    with _lock:
        entry = _held.get(key)
        if entry is not None and entry[0] is ref:
            del _held[key]


def holder_of(param) -> Hold | None:
    with _lock:
        entry = _held.get(id(param))
    return entry[1] if entry is not None and entry[0]() is param else None


def check_not_held(model) -> None:
    """Raise ConfigError when any parameter of `model` is held by a tierflow engine, before any
    work: its data is a NaN placeholder, not the weights."""
    for name, param in model.named_parameters():
        holder = holder_of(param)
        if holder is None:
            continue
        if holder.closed:
            raise ConfigError(
                f"this model's weights were held by a tierflow engine that was closed without giving them "
                f"back (parameter {name!r} is a placeholder now: its data lived in host or NVMe tiers and "
                f"went with the engine); build a new model, or resume from a checkpoint "
                f"(save one with engine.save(...) before engine.close())")
        raise ConfigError(
            f"this model's weights are held by a tierflow engine (parameter {name!r} lives in its tiers, "
            f"the model only holds a placeholder); use that engine, or build a new model / resume from "
            f"a checkpoint")
