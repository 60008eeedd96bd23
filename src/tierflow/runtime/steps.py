"""Optimizer steps: `opt.step()` records an AdamW update per parameter; units apply them later.

The update of a unit runs just ahead of its next fetch (residency.py), overlapped with the
next forward's compute of earlier units, or at `flush()` before state is read. Every update
of one step reads the same `StepGate` (the clip coefficient and whether the gradients were
finite), so a step with non-finite gradients is skipped everywhere at once.
"""
from __future__ import annotations

import warnings

from tierflow.errors import ConfigError, NonFiniteError, TierflowError
from tierflow.runtime.updates import PendingUpdate


class OptimizerSteps:
    """Step counters per parameter, and the recording of each step's updates."""

    def __init__(self, units, residency, grads, health, bookkeeping):
        self.units, self.residency, self.grads, self.health = units, residency, grads, health
        self.bookkeeping = bookkeeping      # the engine's lock (hooks off inside)
        self.counts: dict[int, int] = {}    # slot index -> AdamW steps taken
        self.optimizer = None               # the tierflow.AdamW attached to the engine
        self.skipped = 0                    # steps skipped for non-finite gradients
        self._last = None                   # (StepGate, slot indices) of the last recorded step

    def attach(self, optimizer, known_params: set[int]) -> None:
        if self.optimizer is not None and self.optimizer is not optimizer:
            raise ConfigError("this engine already has an optimizer")
        for group in optimizer.param_groups:
            for param in group["params"]:
                if id(param) not in known_params:
                    raise ConfigError("the optimizer was given a parameter that is not part of the "
                                      "engine's model")
        self.optimizer = optimizer

    def record(self, hyper_params: dict) -> None:
        """Record an AdamW update for every parameter with a gradient; applied lazily."""
        self._gradients_in()
        with self.bookkeeping():
            self._check_last()
            chosen = [(unit, [slot for slot in unit.slots if slot.trainable and slot.index in self.grads.has_grad
                              and id(slot.param) in hyper_params]) for unit in self.units]
            chosen = [(unit, slots) for unit, slots in chosen if slots]
            if any(self.residency.of[unit.uid].refs for unit, _ in chosen):
                raise TierflowError("opt.step() was called while a forward or backward pass is "
                                    "still using the parameters")
            gate = self.grads.gate() if chosen else None  # clip coefficient and finiteness
            stepped = []
            for unit, slots in chosen:
                updates = []
                for slot in slots:
                    self.counts[slot.index] = self.counts.get(slot.index, 0) + 1
                    stepped.append(slot.index)
                    updates.append(PendingUpdate(slot, hyper_params[id(slot.param)], self.counts[slot.index],
                                                 gate.scale, gate, self.grads.forms.get(unit.uid)))
                self._replace_pending(unit.uid, updates)
            self._last = (gate, stepped) if chosen else None
            self.grads.zero()

    def _replace_pending(self, uid: int, updates: list) -> None:
        residency, res = self.residency, self.residency.of[uid]
        residency.update_now(uid)  # two steps without a forward between: older one first
        if res.flat is not None and not residency.is_permanent(uid):
            residency.evict(uid)  # its weights are about to change
        res.pending = updates

    def flush(self) -> None:
        """Apply every recorded update now (before reading or saving the state)."""
        self._gradients_in()
        with self.bookkeeping():
            for uid in range(len(self.units)):
                self.residency.update_now(uid)
            self._check_last()

    def _gradients_in(self) -> None:
        """The engine may still train, and every gradient has reached its tier."""
        self.health.check()
        with self.health.marks_failure():
            self.grads.wait()

    def _check_last(self) -> None:
        """Raise (or, with AdamW(skip_nonfinite=True), warn) if the last recorded step had
        non-finite gradients. Its updates were skipped on every lane (found_inf), so the state is
        that of the step before; the step counters are set back to match. Checked one step late,
        when its flag is long on the host: recording a step never waits for the GPU."""
        if self._last is None:
            return
        (gate, stepped), self._last = self._last, None
        if not gate.skipped():
            return
        for index in stepped:
            self.counts[index] -= 1
            if not self.counts[index]:
                del self.counts[index]
        self.skipped += 1
        message = ("the gradients of the last optimizer step were not finite (NaN or inf): the step "
                   "was skipped, weights and AdamW state are those of the step before. Lower the "
                   "learning rate, check the data for bad batches, or (bf16/fp16) look for overflow")
        if self.optimizer is not None and getattr(self.optimizer, "skip_nonfinite", False):
            warnings.warn(message)
            return
        raise NonFiniteError(message + "; tierflow.AdamW(..., skip_nonfinite=True) skips such steps "
                                       "and trains on")

    def by_name(self, named_slots) -> dict[str, int]:
        return {slot.name: self.counts[slot.index] for _, slot in named_slots if slot.index in self.counts}

    def set_by_name(self, steps: dict[str, int], named_slots) -> None:
        self.flush()
        index = {slot.name: slot.index for _, slot in named_slots}
        unknown = set(steps) - set(index)
        if unknown:
            raise ConfigError(f"optimizer steps for unknown parameters: {sorted(unknown)[:5]}")
        self.counts = {index[name]: int(step) for name, step in steps.items()}
