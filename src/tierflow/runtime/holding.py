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


class Adoption:
    """An engine's hold on the model's parameters, from setup to close: `take` detaches them
    (keeping the original tensors until `settle`, for `give_back` after a failed setup) and
    records those that become placeholders; `close` marks them closed."""

    def __init__(self):
        self.hold = Hold()
        self.originals: list = []  # (parameter, its own tensor), until setup completes

    def take(self, units, residency) -> None:
        """Detach the units' parameters (residency.attach_permanent) and record the ones that
        become placeholders: units computed where their state lives keep viewing real data."""
        seen = {}
        for unit in units:
            for slot in unit.slots:  # (tied parameters are shared: once each)
                seen.setdefault(id(slot.param), (slot.param, slot.param.data))
        self.originals = list(seen.values())
        hold([slot.param for unit in units if not residency.is_permanent(unit.uid) for slot in unit.slots],
             self.hold)
        residency.attach_permanent()

    def settle(self) -> None:
        """Setup completed: the original tensors may go."""
        self.originals = []

    def give_back(self) -> None:
        """A failed setup: every parameter gets its own tensor back (values and strides)."""
        for param, data in self.originals:
            param.data = data
        release([param for param, _ in self.originals], self.hold)
        self.originals = []

    def close(self) -> None:
        """The engine closed: the placeholders' data went with it (offloading them stays refused)."""
        self.hold.closed = True


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
