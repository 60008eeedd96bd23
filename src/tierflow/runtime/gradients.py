"""Gradients leave the device as soon as autograd has accumulated them.

A drain thread adds each gradient (cast to fp32) into its unit's gradient array
in the unit's home tier and records the norm of the accumulated gradient, so
global-norm clipping needs no second pass over the tiers and gives exactly what
`torch.nn.utils.clip_grad_norm_` gives (same per-parameter norms, same order,
same arithmetic). The clip coefficient is not multiplied into the stored
gradients here: AdamW multiplies each window just before it uses it.

A gradient computed in a 2-byte dtype (bf16/fp16 compute) that goes to host memory or NVMe is
kept there in that dtype when it is the first of its step (the "packed" form: element i at byte
2*i of the unit's fp32 gradient array). Widening it to fp32 is exact, so AdamW, which widens it
as it reads it (updates.py), computes exactly what it would from the fp32 gradient, and each
parameter's gradient costs 2 B instead of 4 each way: on a GPU, half the device->host link and
host-memory bytes of the drain; on NVMe, 4 B fewer per parameter per step. A unit's gradients
are widened in place the moment a second micro-batch accumulates into them (sums are fp32, as
torch's), and from then on gradients stay fp32 (widening costs more bytes than packing saves).
`forms` says which units hold the packed form.

With data-parallel ranks (`dist`), a unit's gradients are first collected into one
fp32 bucket; when every trainable parameter of the unit has reported (or at `wait`,
for units with unused parameters) the drain thread reduce-scatters the bucket and
accumulates this rank's shard; the recorded norms are then shard norms, combined
over ranks by `clip`.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from tierflow.memory.budget import Budget
from tierflow.errors import ConfigError, UnsupportedError
from tierflow.core.layout import Slot, Unit, stored_grad_bytes
from tierflow.runtime.updates import StepGate
from tierflow.memory.tiers import FP32, StateIO, UnitState


class GradientSink:
    """Accumulates gradients into their tiers and keeps what clipping needs."""

    def __init__(self, io: StateIO, device_budget: Budget, device, count, events, dist=None, units=()):
        self.io = io
        self.device_budget = device_budget
        self.device = device
        self._count = count                        # count(key, nbytes): engine's I/O counters
        self.events = events
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tierflow-drain")
        self._futures: list[Future] = []
        self.has_grad: set[int] = set()            # slot indices with a gradient since zero()
        self.norms: dict[int, torch.Tensor] = {}   # slot index -> norm of its accumulated grad
        self.scale: torch.Tensor | None = None     # clip coefficient for the coming step
        self.total: torch.Tensor | None = None     # total norm of the raw gradients (after clip)
        self.dist = dist                           # distributed.Dist, or None (one process)
        self._unit_of = {s.index: u for u in units for s in u.slots}
        self._buckets: dict[int, list] = {}        # unit id -> [(state, slot, grad, fresh, nbytes)]
        self._asked: set[int] = set()              # slots whose norm torch asked for (torch_idioms.py)
        self._clipping = None                      # (coefficient, slots) of a torch clip under way
        # unit id -> the 2-byte dtype its gradient array holds them in (packed form; absent: fp32).
        # Kept across steps: it describes the array's contents until new gradients arrive.
        self.forms: dict[int, torch.dtype] = {}
        self._formed: set[int] = set()             # units whose form this step's gradients chose
        self.packs = dist is None                  # ranks reduce-scatter fp32 buckets: never packed
        self.accumulates = False                   # a step had micro-batches: pack no more

    def submit(self, state: UnitState, slot: Slot, grad: torch.Tensor, nbytes: int) -> None:
        """Queue one gradient; `nbytes` of device budget are released once it has left."""
        fresh = slot.index not in self.has_grad
        self.has_grad.add(slot.index)
        if self.dist is not None:
            self._bucket(state, slot, grad, fresh, nbytes)
            return
        if state.home == "device" and self.device.is_cuda:
            # Into a GPU-resident home: a few kernels queued on the compute stream that produced
            # the gradient (no hand-off); a thread hand-off would cost more.
            self._accumulate(state, slot, grad, fresh, nbytes)
            return
        produced = self.device.record_event()  # on the stream autograd computed `grad` on
        self._futures.append(self._executor.submit(self._drain, state, slot, grad, fresh, nbytes, produced))

    def _drain(self, state: UnitState, slot: Slot, grad: torch.Tensor, fresh: bool, nbytes: int,
               produced) -> None:
        """Drain thread: copy (first micro-batch) or add (later ones) into the fp32 gradient, on
        the drain lane once the compute stream has produced the gradient."""
        with self.events.span("drain", slot.name, nbytes), self._drain_lane(produced, [grad]):
            self._accumulate(state, slot, grad, fresh, nbytes)

    @contextlib.contextmanager
    def _drain_lane(self, produced, grads: list):
        """The drain lane, after the compute stream produced `grads` (freed by the drain thread:
        handed over, so not reused before the drain is done); complete on exit, so the norms it
        recorded are final before anyone waits on the job."""
        with self.device.lane("drain"):
            self.device.wait_event(produced)
            for grad in grads:
                self.device.hand_over(grad)
            yield
            self.device.synchronize_lane()

    def _accumulate(self, state: UnitState, slot: Slot, grad: torch.Tensor, fresh: bool, nbytes: int) -> None:
        try:
            incoming = grad.detach().reshape(-1)  # the engine took `grad`: ours to reuse
            if not self._keeps_packed(state, slot, incoming.dtype, fresh):
                incoming = incoming.to(FP32)
            if state.home != "device":  # the bytes that leave: packed, or widened to fp32
                self._count("device_to_host", incoming.numel() * incoming.element_size())
            self._add_into(state, slot, incoming, slot.offset, fresh)
        finally:
            self.device_budget.release(nbytes)

    def _keeps_packed(self, state: UnitState, slot: Slot, dtype: torch.dtype, fresh: bool) -> bool:
        """Whether this gradient is stored in its own 2-byte dtype. The first gradient of a unit
        in a step decides for the unit; a later micro-batch widens the unit's array first."""
        unit = self._unit_of[slot.index]
        if unit.uid not in self._formed:
            self._formed.add(unit.uid)
            self.forms.pop(unit.uid, None)
            if (self.packs and not self.accumulates and fresh and stored_grad_bytes(state.home, dtype) == 2
                    and "grad" in state.arrays):
                self.forms[unit.uid] = dtype
        if unit.uid in self.forms and not fresh:
            self._widen(state, unit)
        return unit.uid in self.forms

    def _widen(self, state: UnitState, unit: Unit) -> None:
        """Rewrite a unit's packed gradients as fp32, in place, last piece first: the fp32 form of
        elements [a, b) covers packed bytes [4a, 4b), all at or after the packed bytes [2a, 2b)
        of its own elements, so no packed value is overwritten before it is read."""
        packed = {"grad": self.forms.pop(unit.uid)}
        # Widening costs more bytes than packing saved: with micro-batches, gradients stay fp32.
        self.accumulates = True
        for start, count in reversed(list(self.io.pieces(state, 0, unit.trainable_numel))):
            window = self.io.open(state, ("grad",), start, count, packed=packed)
            try:
                values = window.views[0].to(FP32)  # a copy: read before the fp32 form lands on it
            finally:
                self.io.close(window)
            self.io.write_from(state, "grad", values, start)

    def _add_into(self, state: UnitState, slot: Slot, incoming: torch.Tensor, origin: int, fresh: bool) -> None:
        """Copy or add `incoming` (unit elements from `origin`, within `slot`; ours to reuse) into
        the unit's gradient array and record the norm of what is now there. `incoming` is fp32,
        or a fresh gradient in its 2-byte dtype, copied in packed (half the bytes)."""
        if fresh:
            # Accumulated in fp32 as it reads a packed gradient (no fp32 copy of it on the hot path)
            self.norms[slot.index] = torch.linalg.vector_norm(incoming, dtype=FP32)
        packed = {"grad": incoming.dtype} if incoming.dtype != FP32 else None
        pieces = list(self.io.pieces(state, origin, incoming.numel()))
        norm = None
        for start, count in pieces:
            window = self.io.open(state, ("grad",), start, count, read=not fresh, packed=packed)
            try:
                target = window.views[0]
                part = incoming[start - origin:start - origin + count]
                if fresh:
                    target.copy_(part)  # straight into the (pinned) home or staging buffer
                else:
                    target.add_(part if target.device == part.device else self.device.to_host(part))
                    if len(pieces) == 1:
                        norm = torch.linalg.vector_norm(target)  # before the window is released
                    else:  # gather the sum back: its norm is then taken in one piece
                        part.copy_(target)
            except BaseException:
                self.io.close(window)
                raise
            self.io.close(window, write=("grad",))
        if not fresh and pieces:
            # The norm of the whole accumulated gradient, as torch takes it: a norm combined
            # from windows' norms would differ in the last bit (it did on 16 threads).
            self.norms[slot.index] = norm if norm is not None else torch.linalg.vector_norm(incoming)

    # ---- data-parallel ranks --------------------------------------------------------------
    def _bucket(self, state, slot, grad, fresh, nbytes) -> None:
        """Collect a gradient in its unit's bucket; a complete bucket goes to the drain thread."""
        unit = self._unit_of[slot.index]
        entries = self._buckets.setdefault(unit.uid, [])
        entries.append((state, slot, grad, fresh, nbytes))
        if len({e[1].index for e in entries}) == sum(s.trainable for s in unit.slots):
            self._send_bucket(unit.uid)

    def _send_bucket(self, uid: int) -> None:
        entries = self._buckets.pop(uid)
        unit = self._unit_of[entries[0][1].index]
        produced = self.device.record_event()  # every gradient of the bucket is queued before it
        self._futures.append(self._executor.submit(self._drain_bucket, unit, entries, produced))

    def _drain_bucket(self, unit, entries, produced) -> None:
        """Drain thread: sum the unit's gradients into one fp32 buffer, reduce-scatter it (the
        average over ranks), and accumulate this rank's shard into its home tier."""
        with self._drain_lane(produced, [entry[2] for entry in entries]):
            self._drain_bucket_on_lane(unit, entries)

    def _drain_bucket_on_lane(self, unit, entries) -> None:
        nbytes = sum(e[4] for e in entries)
        with self.events.span("drain", unit.name, nbytes):
            try:
                device = entries[0][2].device
                bucket = torch.zeros(unit.numel, dtype=FP32, device=device)
                for _state, slot, grad, _fresh, _n in entries:
                    bucket[slot.offset:slot.offset + slot.numel].add_(grad.detach().reshape(-1))
            finally:
                self.device_budget.release(nbytes)
            shard = self.dist.reduce_scatter(bucket, unit.name)
            del bucket
            state = entries[0][0]
            fresh = {}
            for _state, slot, _grad, is_fresh, _n in entries:
                fresh.setdefault(slot.index, (slot, is_fresh))
            if state.home != "device":
                self._count("device_to_host", shard.numel() * 4)
            for slot, is_fresh in fresh.values():
                lo, hi = max(slot.offset, state.base), min(slot.offset + slot.numel, state.limit)
                if lo < hi:
                    self._add_into(state, slot, shard[lo - state.base:hi - state.base], lo, is_fresh)

    def wait(self) -> None:
        """Block until every queued gradient is in its tier (drain errors surface here)."""
        for uid in sorted(self._buckets):  # units some of whose parameters got no gradient
            self._send_bucket(uid)
        futures, self._futures = self._futures, []
        for future in futures:
            future.result()

    def zero(self) -> None:
        """The next backward starts afresh (after the optimizer recorded what it needs)."""
        self.wait()
        self.has_grad.clear()
        self._formed.clear()
        self.norms.clear()
        self.scale = None
        self.total = None
        self._asked.clear()
        self._clipping = None

    def _raw_total(self) -> torch.Tensor:
        """L2 norm over every gradient as accumulated (before any clip), on the compute device."""
        self.wait()
        target = self.device.device
        norms = self._recorded_norms(sorted(self.norms))
        if self.dist is not None:
            return self.dist.global_norm(norms, target)
        if not norms:
            return torch.zeros((), device=target)
        return torch.linalg.vector_norm(torch.stack(norms), 2.0)

    def _recorded_norms(self, indices: list[int]) -> list[torch.Tensor]:
        """`_recorded_norm` of each, in order. Norms taken on the host (sums accumulated in host
        or NVMe homes) go to the GPU in one asynchronous copy from pinned memory: one blocking
        copy per parameter would make the host wait for the whole queued backward."""
        on_host = [i for i in indices if self.norms[i].device != self.device.device]
        if not self.device.is_cuda or len(on_host) < 2:
            return [self._recorded_norm(i) for i in indices]
        staged = self.device.host_empty(len(on_host), FP32)
        torch.stack([self.norms[i] for i in on_host], out=staged)
        moved = dict(zip(on_host, staged.to(self.device.device, non_blocking=True)))
        return [moved[i] if i in moved else self._recorded_norm(i) for i in indices]

    def _recorded_norm(self, index: int) -> torch.Tensor:
        """A parameter's recorded gradient norm on the compute device, for the current stream
        (computed on the drain lane; complete, since its job synchronised)."""
        norm = self.norms[index].to(self.device.device)
        self.device.hand_over(norm)
        return norm

    def clip(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> torch.Tensor:
        """Total L2 norm of the gradients as they stand (after earlier clips of this step, as
        torch's would be); sets the coefficient AdamW will apply."""
        if float(norm_type) != 2.0:
            raise ConfigError("tierflow clips by the L2 norm only (norm_type=2)")
        if self.total is None:
            self.total = self._raw_total()
        # A second clip in one step sees gradients already multiplied by the first coefficient.
        total = self.total if self.scale is None else self.total * self.scale
        if error_if_nonfinite and (total.isnan() or total.isinf()):
            raise RuntimeError(f"the total norm of gradients is non-finite ({total.item()})")
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        self.scale = coef if self.scale is None else self.scale * coef
        return total

    # ---- torch.nn.utils.clip_grad_norm_ over param.grad views (torch_idioms.py) -------------
    def _torch_clip_check(self, what: str) -> None:
        if self.dist is not None:
            raise UnsupportedError(
                f"{what} of a held gradient: with data-parallel ranks each rank holds a shard, so torch "
                f"would clip by a rank's norm; use opt.clip_grad_norm_(max_norm) (the global norm)")

    def slot_norm(self, index: int) -> torch.Tensor:
        """L2 norm of one parameter's gradient as it stands (after this step's clips), on the
        compute device: what torch.linalg.vector_norm(param.grad) would give."""
        self._torch_clip_check("the norm")
        self.wait()
        norm = self._recorded_norm(index)
        self._asked.add(index)
        return norm if self.scale is None else norm * self.scale

    def scale_slot(self, index: int, coefficient) -> None:
        """param.grad.mul_(coefficient): applied, as the clip coefficient, once every held
        gradient got it (torch's clip multiplies them one by one by the same coefficient)."""
        self._torch_clip_check("scaling")
        if self._clipping is None:
            asked, self._asked = self._asked, set()
            if asked and asked != self.has_grad:
                raise UnsupportedError(
                    f"torch.nn.utils.clip_grad_norm_ over {len(asked)} of the {len(self.has_grad)} parameters "
                    f"with a gradient: tierflow applies one clip coefficient to every gradient; pass all of "
                    f"engine.parameters(), or use opt.clip_grad_norm_(max_norm)")
            self._clipping = (coefficient, set())
        first, seen = self._clipping
        seen.add(index)
        if seen >= self.has_grad:
            self._clipping = None
            coef = torch.as_tensor(first, dtype=FP32, device=self.device.device).reshape(())
            self.scale = coef if self.scale is None else self.scale * coef

    def forget(self, index: int) -> None:
        """param.grad = None: this parameter's next gradient starts afresh; it is not stepped."""
        self.wait()
        if index in self.has_grad:
            self.has_grad.discard(index)
            self.norms.pop(index, None)
            self.total = None  # a later clip sums the norms that are left (times this step's scale)

    def gate(self) -> StepGate:
        """The clip coefficient and a found-inf flag for this step's updates, ordered for every
        lane that runs them (see StepGate); recorded without waiting for the GPU."""
        if self._clipping is not None:
            seen = len(self._clipping[1])
            self._clipping = None
            raise UnsupportedError(
                f"the gradients of {seen} of the {len(self.has_grad)} parameters with a gradient were scaled "
                f"(torch.nn.utils.clip_grad_norm_ or grad.mul_ over a subset): tierflow applies one clip "
                f"coefficient to every gradient; nothing was stepped. Clip all of engine.parameters(), or "
                f"use opt.clip_grad_norm_(max_norm)")
        total = self.total if self.total is not None else self._raw_total()
        found_inf = (~torch.isfinite(total)).to(FP32)
        if not self.device.is_cuda:
            return StepGate(self.scale, found_inf)
        for tensor in (self.scale, found_inf):
            if tensor is not None:  # read on the copy lane by GPU-side updates of host state
                self.device.hand_over_to_lane(tensor, "copy")
        ready = self.device.record_event()
        scale = self.scale if self.scale is not None else torch.ones((), device=found_inf.device)
        host = self.device.host_empty(2, FP32)
        host.copy_(torch.stack([scale.to(FP32), found_inf]), non_blocking=True)
        return StepGate(self.scale, found_inf, host, ready, self.device.record_event())

    def close(self) -> None:
        self._executor.shutdown(wait=True)
