"""What the engine does as the model runs: the hooks of forward and backward (hooks.py) call
these, and they drive residency (which units to hold, fetch ahead, release).

Forward: a hooked module acquires its units, the trace records the order of first use, and
the next units in trace order are fetched ahead within the prefetch window. Autograd's saved
views of unit buffers become tokens (pack); unpacking one in backward acquires the unit again
and prefetches the units before it. Each gradient goes to the drain as soon as autograd has
it; a unit is released once all its gradients are out.
"""
from __future__ import annotations

import torch
from torch import nn

from tierflow.core.layout import Slot, Unit
from tierflow.core.trace import Trace
from tierflow.runtime.events import Span
from tierflow.runtime.hooks import SavedUnitView


class Passes:
    """Forward and backward bookkeeping of one engine."""

    def __init__(self, engine):
        self.engine = engine
        self.residency = engine.residency
        self.trace = Trace()
        self.scopes: list[list[int]] = []       # units held on demand until their module exits
        self._module_starts: list[float] = []
        self._backward_holds: set[int] = set()
        self._backward_callback_queued = False
        self.cursor = 0  # trace position of the unit acquired last in forward
        self.cyclic_prefetch = False

    @property
    def cyclic_prefetch(self) -> bool:
        """Generation (infer/) runs the same forward again and again: the units after the last
        one are the next forward's first, so prefetch wraps around to them, and residency
        evicts by distance ahead in that cycle (`distance_ahead`) instead of least recently used."""
        return self.residency.next_use is not None

    @cyclic_prefetch.setter
    def cyclic_prefetch(self, value: bool) -> None:
        self.residency.next_use = self.distance_ahead if value else None

    def distance_ahead(self, uid: int) -> int:
        """How many units of the forward order come before `uid`'s next use, counted from the
        unit in use, wrapping around into the next forward (a unit not in the order: the end)."""
        n, position = len(self.trace.order), self.trace.position(uid)
        return (position - self.cursor) % n if position < n else n

    # ---- forward ----------------------------------------------------------------------------
    def begin_forward(self) -> None:
        engine = self.engine
        if not engine.fetches_on_demand and not self.scopes:
            self._apply_device_updates()
        if engine.activations is not None:
            engine.activations.begin_forward()
        self.trace.begin()
        self.scopes.append([])

    def _apply_device_updates(self) -> None:
        """Apply every recorded update now, in use order (all units live on the device)."""
        with self.engine.bookkeeping():
            order = sorted(range(len(self.residency.of)), key=self.trace.position)
            queued = [uid for uid in order
                      if self.residency.of[uid].pending and self.residency.start_fetch(uid, required=True)]
            for uid in queued:
                self.residency.finish_fetch(uid)

    def end_forward(self) -> None:
        with self.engine.bookkeeping():
            for uid in self.scopes.pop():
                self.residency.release(uid)
            self.trace.end()
            if self.engine.activations is not None:
                self.engine.activations.end_forward()

    def enter_module(self, uids: list[int]) -> None:
        events = self.engine.events
        self._module_starts.append(events.now())
        with self.engine.bookkeeping():
            for uid in sorted(uids, key=self.trace.position):
                self.trace.record(uid)
                self.cursor = self.trace.position(uid)
                self.residency.acquire(uid)
            activations = self.engine.activations
            if activations is None or not activations.recomputing:  # not in backward
                last = max(uids, key=self.trace.position)
                self.residency.prefetch(self.upcoming(last))
                self.residency.gather_ahead(self.trace.after(last))
            self.scopes.append([])

    def upcoming(self, uid: int) -> list[int]:
        """Units used after `uid` in forward order (then, when cyclic, the next forward's)."""
        after = self.trace.after(uid)
        position = self.trace.position(uid)
        if self.cyclic_prefetch and position < len(self.trace.order):
            after = after + self.trace.order[:position]
        return after

    def exit_module(self, uids: list[int]) -> None:
        with self.engine.bookkeeping():
            for uid in self.scopes.pop():
                self.residency.release(uid)
            for uid in uids:
                self.residency.release(uid)
        start = self._module_starts.pop()
        events = self.engine.events
        if events.enabled:
            events.add(Span("forward", self.engine.units[uids[0]].name, start, events.now(), 0, "main"))

    def ensure_resident(self, uid: int) -> None:
        """On-demand fetch of a parameter used outside its module (held until the scope ends)."""
        with self.engine.bookkeeping():
            if self.residency.is_current(uid):
                return
            self.trace.record(uid)
            self.residency.acquire(uid)
            self.scopes[-1].append(uid)

    # ---- backward ---------------------------------------------------------------------------
    def pack_saved(self, tensor: torch.Tensor):
        engine = self.engine
        if tensor.layout != torch.strided or tensor.device != engine.device.device:
            return tensor
        uid = self.residency.owner_of(tensor)
        if uid is None and engine.activations is not None:
            return engine.activations.pack(tensor)  # an activation: keep, offload (activations.py)
        if uid is None or tensor.dtype != engine.compute_dtype:
            return tensor
        # The offset is kept relative to the unit's buffer: the buffer it is fetched into again
        # for backward may start elsewhere in its storage (aligned buffers for direct reads).
        start = self.residency.of[uid].flat.storage_offset()
        return SavedUnitView(uid, tensor.size(), tensor.stride(), tensor.storage_offset() - start)

    def unpack_saved(self, saved):
        engine = self.engine
        if not isinstance(saved, SavedUnitView):
            return saved if engine.activations is None else engine.activations.unpack(saved)
        with engine.bookkeeping():
            self._queue_backward_callback()
            uid = saved.uid
            if uid not in self._backward_holds:
                self._backward_holds.add(uid)
                self.residency.acquire(uid)
                self.residency.of[uid].grads_left = sum(s.trainable for s in engine.units[uid].slots)
                self.residency.prefetch(self.trace.before(uid))
                self.residency.gather_ahead(self.trace.before(uid))
            flat = self.residency.of[uid].flat
        return flat.as_strided(saved.size, saved.stride, flat.storage_offset() + saved.offset)

    def on_grad(self, unit: Unit, slot: Slot, param: nn.Parameter) -> None:
        """A gradient is complete for this backward: send it to the unit's home tier."""
        grad, param.grad = param.grad, None
        engine = self.engine
        with engine.bookkeeping():
            self._queue_backward_callback()
            res = self.residency.of[unit.uid]
            if res.pending:  # an update from the last step still reads the old gradient
                self.residency.update_now(unit.uid)
            nbytes = grad.numel() * grad.element_size()
            self.residency.reserve_device(nbytes, f"the gradient of {slot.name}", required=True)
            engine.grads.submit(engine.states[unit.uid], slot, grad, nbytes)
            if unit.uid in self._backward_holds:
                res.grads_left -= 1
                if res.grads_left == 0:
                    self._backward_holds.discard(unit.uid)
                    self.residency.release(unit.uid)

    def _queue_backward_callback(self) -> None:
        if not self._backward_callback_queued:
            self._backward_callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)

    def _end_backward(self) -> None:
        with self.engine.bookkeeping():
            for uid in self._backward_holds:
                self.residency.release(uid)
            self._backward_holds.clear()
            self._backward_callback_queued = False
