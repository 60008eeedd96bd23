"""Reading and writing the training state in its tiers, one parameter at a time.

Checkpoints, `state_dict()` and resuming go through here: every array is read or written
window by window (NVMe state through the staging buffers), so no more than a window of it
is in memory at once.
"""
from __future__ import annotations

import torch

from tierflow.core.layout import Slot, Unit, checked_source
from tierflow.errors import TierflowError
from tierflow.memory.packed import refuse_write
from tierflow.memory.tiers import ARRAY_CLASS, FP32


class StateAccess:
    """Full tensors out of the tiers and back, by parameter."""

    def __init__(self, engine):
        # The engine's parts it reads: units, states, io, dist, residency, steps, health,
        # module, tiled, param_dtype, compute_dtype, bookkeeping, grads (the gradients' form).
        self.engine = engine

    def named_slots(self):
        """(unit, slot) for every parameter, in unit order; slot.name is the parameter name."""
        for unit in self.engine.units:
            for slot in unit.slots:
                yield unit, slot

    def read_array(self, unit: Unit, slot: Slot, name: str = "master") -> torch.Tensor:
        """One parameter's slice of an array ('master', 'exp_avg', 'exp_avg_sq', 'grad'), as a
        new fp32 CPU tensor of the parameter's shape. Call `flush()` first for current values
        (a gradient is read once the drain has written every gradient queued so far)."""
        engine = self.engine
        engine.health.check()
        if name == "grad":
            with engine.health.marks_failure():
                engine.grads.wait()
        dist, io = engine.dist, engine.io
        if unit.weights is not None:  # compressed (frozen: its 'master' is its weights)
            return engine.residency.packed.read_slot(engine.states[unit.uid], unit, unit.slots.index(slot))
        out = torch.empty(slot.numel, dtype=FP32) if dist is None else torch.zeros(slot.numel, dtype=FP32)
        state = engine.states[unit.uid]
        form = engine.grads.forms.get(unit.uid) if name == "grad" else None
        packed = {"grad": form} if form is not None else None  # kept in the compute dtype: widened here
        for start, count in io.pieces(state, slot.offset, slot.numel):
            window = io.open(state, (name,), start, count, packed=packed)
            try:
                out[start - slot.offset:start - slot.offset + count].copy_(window.views[0])
            finally:
                io.close(window)
        if dist is not None:  # every element is on exactly one rank: the sum assembles it
            dist.all_reduce_sum(out, f"all-reduce assembling {slot.name}")
        return out.view(slot.shape)

    def write_array(self, unit: Unit, slot: Slot, name: str, value: torch.Tensor) -> None:
        """Overwrite one parameter's slice of an array in its home tier (e.g. when resuming).
        Writing 'master' also refreshes the compute-dtype weights and drops device copies."""
        engine = self.engine
        engine.steps.flush()
        value = checked_source(value, slot).reshape(-1)
        if unit.weights is not None:
            refuse_write(unit, name)
        state, io = engine.states[unit.uid], engine.io
        with engine.bookkeeping():
            res = engine.residency.of[unit.uid]
            if res.refs:
                raise TierflowError("cannot overwrite state while a forward or backward pass uses it")
            engine.device.synchronize_event(res.copied)  # no async copy still reads the host arrays
            # (a rank whose shard holds no trainable elements has no moment arrays: nothing to write)
            io.write_from(state, name, value.to(state.dtypes.get(state.key(name), FP32)), slot.offset)
            if name == "master" and "weights" in state.arrays:
                io.write_from(state, "weights", value.to(engine.compute_dtype), slot.offset)
            if name == "master" and res.flat is not None and not engine.residency.is_permanent(unit.uid):
                engine.residency.evict(unit.uid)
            if name == "master" and engine.experts is not None:  # cached experts of the unit are stale
                engine.experts.forget(unit.uid)

    def iter_windows(self, unit: Unit, slot: Slot, names=("master",)):
        """Yield one parameter's arrays `names` window by window as CPU tensors (NVMe state through
        the staging buffers, the next window read ahead: one window in memory at a time). Call
        `flush()` first. Each yielded list is valid until the next one is asked for."""
        self.engine.health.check()
        io, state = self.engine.io, self.engine.states[unit.uid]
        if unit.weights is not None:  # compressed: the parameter dequantized, in one piece
            yield [self.read_array(unit, slot, name) for name in names]
            return
        for window in io.windows(state, tuple(names), io.pieces(state, slot.offset, slot.numel)):
            try:
                # A frozen unit's 'master' is its compute-dtype weights: callers get fp32 as usual.
                yield [view.cpu().to(FP32) if name == "master" else view.cpu()
                       for name, view in zip(names, window.views)]
            finally:
                io.close(window)

    def state_dict(self) -> dict:
        """Full tensors (in the model's dtype), same keys as `model.state_dict()`."""
        engine = self.engine
        engine.steps.flush()
        slots = {id(s.param): (s, u.uid) for u in engine.units for s in u.slots}
        cache: dict[int, torch.Tensor] = {}
        result = {}
        for key, value in engine.module.state_dict(keep_vars=True).items():
            if id(value) in slots:
                if id(value) not in cache:
                    slot, uid = slots[id(value)]
                    cache[id(value)] = self.read_array(engine.units[uid], slot).to(engine.param_dtype)
                result[key] = cache[id(value)]
            else:
                result[key] = value.detach().clone()
        if engine.tiled:
            from tierflow.core.tiling import merge
            result = merge(result, engine.tiled)
        return result

    def optimizer_state(self) -> dict:
        """id-free view of AdamW state: parameter name -> {step, exp_avg, exp_avg_sq}."""
        engine = self.engine
        engine.steps.flush()
        counts = engine.steps.counts
        result = {}
        for unit, slot in self.named_slots():
            if slot.trainable and slot.index in counts:
                result[slot.name] = {"step": counts[slot.index],
                                     "exp_avg": self.read_array(unit, slot, "exp_avg"),
                                     "exp_avg_sq": self.read_array(unit, slot, "exp_avg_sq")}
        return result

    def placement(self) -> dict:
        """Bytes per tier per tensor class, as planned and as now on the device."""
        engine = self.engine
        table = {tier: {} for tier in ("device", "host", "nvme")}
        for state in engine.states:
            for name in state.arrays:
                cls = ARRAY_CLASS[name]
                table[state.home][cls] = table[state.home].get(cls, 0) + state.nbytes(name)
        table["device"]["working"] = engine.plan.device_working
        table["device"]["buffers"] = sum(b.numel() * b.element_size() for b in engine.module.buffers())
        if engine.plan.staging_bytes:
            table["host"]["staging"] = engine.plan.staging_bytes
        return table
