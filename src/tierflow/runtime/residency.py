"""Residency: which units' weights are on the device, and the jobs that bring them there.

A unit is *acquired* by the module (or backward) that needs it and *released* after; a
released unit stays cached on the device until its room is needed (least recently used
goes first). A fetch job runs on the transfer thread: it applies the unit's recorded AdamW
updates, then copies its weights to the device, on the copy lane (device.py). CPU updates of
state in memory have a thread of their own (the update thread): on a GPU the host-homed units'
(so CPU and GPU updates of different units run at the same time), on a CPU those of the units
computed in place. Units computed in place never move (device-homed ones; on a CPU host-homed
ones too: `Placement.stays`); on a GPU their updates are queued on the compute stream.

All bookkeeping runs under the engine's lock, on the thread that runs forward/backward;
the transfer and update threads only move and compute data.
"""
from __future__ import annotations

import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from tierflow.core.layout import Slot, Unit
from tierflow.core.plan import Placement, working_bytes
from tierflow.core.schedule import eviction_order, prefetch_window, ring_eviction_order
from tierflow.errors import TierflowError
from tierflow.memory.device import ComputeDevice, join_openmp
from tierflow.memory.packed import ARRAY, PackedWeights
from tierflow.memory.tiers import StateIO, UnitState
from tierflow.runtime.direct_fetch import DirectFetches
from tierflow.runtime.spares import SpareBuffers
from tierflow.runtime.updates import apply_updates

SCRATCH_ELEMENTS = 1 << 22  # per device buffer of a GPU-side AdamW of host/NVMe state (8 x 16 MiB)
SCRATCH_BUFFERS = 8         # master, gradient and both moments, fp32, twice (updates.DeviceAdamW)
BUDGET_WAIT_S = 120.0  # how long a fetch waits for in-flight gradients to free device memory


@dataclass
class UnitResidency:
    """Runtime state of one unit on the compute device."""

    flat: torch.Tensor | None = None       # device buffer holding the unit's weights
    fetch: Future | None = None            # in-flight fetch (result: (flat, event))
    refs: int = 0                          # modules / backward currently using it
    last_use: int = 0                      # tick of the last acquire (LRU)
    pending: list = field(default_factory=list)  # PendingUpdates not yet applied
    grads_left: int = 0                    # trainable slots whose gradient is still expected
    copied: object = None                  # event: the last async copy reading its host arrays


class Residency(DirectFetches):
    """Acquire, release, fetch, update and evict units within the device budget."""

    def __init__(self, units: list[Unit], states: list[UnitState], plan: Placement, device: ComputeDevice,
                 io: StateIO, budgets: dict, compute_dtype: torch.dtype, events, dist, count, health):
        self.units, self.states, self.plan = units, states, plan
        self.device, self.io, self.budgets = device, io, budgets
        self.compute_dtype, self.events, self.dist = compute_dtype, events, dist
        self.count, self.health = count, health        # count(key, nbytes); health.fail(exc)
        self.of = [UnitResidency() for _ in units]
        self.transfer = ThreadPoolExecutor(1, thread_name_prefix="tierflow-transfer")
        # CPU AdamW of state in memory gets a thread of its own, so it runs while the transfer
        # thread streams weights and runs the other units' updates: on a GPU the host-homed
        # units' (the others run on the GPU), on a CPU the units computed in place (the
        # transfer thread then starts on the NVMe units' update chain at once).
        self.updater = ThreadPoolExecutor(1, thread_name_prefix="tierflow-update")
        if not device.is_cuda:
            self.transfer.submit(join_openmp)
            self.updater.submit(join_openmp)
        self._tick = itertools.count(1)
        self._owner: dict[int, int] = {}  # data_ptr of a streamed unit's device buffer -> unit id
        self.spares = SpareBuffers(budgets["device"], plan.prefetch_bytes, enabled=not device.is_cuda)
        # Other holders of device memory that give it back when units need it (the expert
        # cache, experts.py): callables (nbytes) -> True if they freed any.
        self.reclaimers: list = []     # f(nbytes) -> bool: give up cached data (MoE experts) when required
        self.idle_droppers: list = []  # f(nbytes) -> bool: free idle buffers (no data) before any eviction
        self.packed = PackedWeights(io, compute_dtype)  # compressed frozen units (memory/packed.py)
        self.reads_ahead = not device.is_cuda and dist is None and any(u.weights is not None for u in units)
        # Device bytes a unit takes while resident (0: it never moves, see is_permanent).
        self.moving = [0 if self.is_permanent(u) else working_bytes(self.units[u], compute_dtype)
                       for u in range(len(units))]
        self.held_bytes = 0  # of the moving units in use (refs > 0)
        self.on_demand = 0   # fetches started by the module that needed the unit: none was ahead
        # Generation (passes.py): a unit's distance ahead in the fixed unit order of a forward
        # (0: the current unit); prefetch and eviction then work as a ring. None: evictions
        # go least recently used first, prefetch stays within the plan's prefetch window.
        self.next_use = None

    def __getitem__(self, uid: int) -> UnitResidency:
        return self.of[uid]

    def __iter__(self):
        return iter(self.of)

    def __len__(self) -> int:
        return len(self.of)

    # ---- holding units ------------------------------------------------------------------
    def acquire(self, uid: int) -> torch.Tensor:
        """Make unit `uid` resident on the device and hold it; returns its flat buffer."""
        res = self.of[uid]
        if res.flat is None and res.fetch is None:
            self.on_demand += 1
            self.start_fetch(uid, required=True)
        if res.fetch is not None:
            self.finish_fetch(uid)
        elif res.pending:  # a device-resident unit with an update still to apply
            self.start_fetch(uid, required=True)
            self.finish_fetch(uid)
        res.refs += 1
        if res.refs == 1:
            self.held_bytes += self.moving[uid]
        res.last_use = next(self._tick)
        if self.dist is not None and res.refs == 1:
            # Every rank takes its first hold of a unit at the same point of the model, so
            # the all-gathers line up (cached copies are re-gathered: deterministic, not lazy).
            state = self.states[uid]
            self.dist.gather(uid, res.flat, state.base, state.limit, self.units[uid].name)
        return res.flat

    def release(self, uid: int) -> None:
        """Drop one hold; the unit stays cached until its device memory is needed."""
        res = self.of[uid]
        res.refs -= 1
        assert res.refs >= 0, f"unit {self.units[uid].name} released more often than acquired"
        if res.refs == 0:
            self.held_bytes -= self.moving[uid]
        if self.dist is not None and res.refs == 0:
            self.dist.forget(uid)  # the next first hold gathers again

    def is_current(self, uid: int) -> bool:
        """On the device with nothing pending (ranks: only a held unit counts as gathered)."""
        res = self.of[uid]
        return res.flat is not None and res.fetch is None and not res.pending and (
            self.dist is None or res.refs > 0)

    def gather_ahead(self, upcoming: list[int]) -> None:
        """Distributed: start the all-gather of the next unit in trace order while the current
        one computes. Decided from trace order and holds only, so every rank does the same."""
        if self.dist is None or not upcoming:
            return
        uid, res = upcoming[0], self.of[upcoming[0]]
        if res.refs or self.dist.is_gathered(uid):
            return
        if res.fetch is None and (res.flat is None or res.pending):
            self.start_fetch(uid, required=True)
        if res.fetch is not None:
            self.finish_fetch(uid)
        state = self.states[uid]
        self.dist.gather_ahead(uid, res.flat, state.base, state.limit, self.units[uid].name)

    def prefetch(self, upcoming: list[int]) -> None:
        """Start fetches of the next units within the prefetch window. During generation the
        units stream ahead as through a ring: the window spans the device working set less the
        units in use (units that never move take none of it), and a fetch evicts only units
        needed after it (ring_eviction_order), so each is read once per forward, even with a
        budget so tight that the plan's window holds not one unit."""
        # On a CPU units that never move take no room: their updates all start at once on the
        # update thread. (On a GPU a device-homed unit's update is queued on the compute stream,
        # and starting them all would put every one ahead of the forward's first kernels.)
        size = (lambda u: working_bytes(self.units[u], self.compute_dtype)) if self.device.is_cuda \
            else self.moving.__getitem__
        window = self.plan.prefetch_bytes
        if self.next_use is not None:
            size, window = self.moving.__getitem__, self.plan.device_working - self.held_bytes
        needs = lambda u: self.of[u].fetch is None and (self.of[u].flat is None or bool(self.of[u].pending))
        for uid in prefetch_window(upcoming, size, needs, window):
            if not self.start_fetch(uid, required=False):
                break
        self._read_ahead(upcoming)

    def _read_ahead(self, upcoming: list[int]) -> None:
        """CPU: start reading the compressed bytes of the units beyond the prefetch window, as
        far as the window's bytes of compressed data reach (memory/packed.py read_ahead)."""
        ahead = 0
        for uid in upcoming if self.reads_ahead else ():
            if self.units[uid].weights is None or not self._reads_direct(uid):
                continue
            ahead += self.states[uid].nbytes(ARRAY)
            if ahead > self.plan.prefetch_bytes:
                return
            res = self.of[uid]
            if res.fetch is None and res.flat is None and not self.packed.read_ahead(self.states[uid], uid):
                return

    def is_permanent(self, uid: int) -> bool:
        """Units computed where their state lives stay attached and never move: device-homed
        ones, and on a CPU host-homed ones (`Placement.stays`). One process only: a rank's
        device-resident state is only its shard, the full weights are gathered."""
        return self.dist is None and self.plan.stays(uid)

    def owner_of(self, tensor: torch.Tensor) -> int | None:
        """The streamed unit whose device buffer `tensor` views, or None."""
        return self._owner.get(tensor.untyped_storage().data_ptr())

    # ---- fetching and updating ---------------------------------------------------------------
    def start_fetch(self, uid: int, required: bool) -> bool:
        """Queue the job that applies pending updates and fills the device buffer."""
        res = self.of[uid]
        pending, res.pending = res.pending, []
        nbytes = 0 if self.is_permanent(uid) else working_bytes(self.units[uid], self.compute_dtype)
        what = f"the weights of unit '{self.units[uid].name}'"
        ahead = None if required else uid  # a prefetch evicts only units needed after it
        if nbytes and not pending and self._reads_direct(uid):
            reused = self._reusable_buffer(self.units[uid].numel, nbytes, ahead)  # None: reserve a new one
            # (a compressed unit also reserves the bytes it is read into, beside a reused buffer)
            extra = nbytes - (reused.numel() * reused.element_size() if reused is not None else 0)
            if extra and not self.reserve_device(extra, what, required, ahead):
                if reused is not None and not self.spares.keep(reused):
                    self.budgets["device"].release(reused.numel() * reused.element_size())
                return False
            res.fetch = self._direct_fetch(uid, reused)
            return True
        if nbytes and not self.reserve_device(nbytes, what, required, ahead):
            res.pending = pending
            return False
        if not nbytes and self.device.is_cuda:
            # A GPU-resident unit's update is a few kernels queued on the compute stream, after
            # the gradients and the clip it reads: no thread or stream hand-off at all.
            res.fetch = Future()
            try:
                self._apply_on_compute(uid, pending)
            except BaseException as exc:
                res.fetch.set_exception(exc)
            else:
                res.fetch.set_result((self.device_view(uid), None))
            return True
        scratch = self._reserve_update_scratch(uid, pending) if nbytes else 0
        in_memory = self.plan.homes[uid] == "host" if self.device.is_cuda else not nbytes
        on_cpu_thread = pending and not scratch and in_memory
        executor = self.updater if on_cpu_thread else self.transfer
        res.fetch = executor.submit(self._fetch_job, uid, pending, nbytes > 0, scratch)
        return True

    def finish_fetch(self, uid: int) -> None:
        res = self.of[uid]
        future, res.fetch = res.fetch, None
        try:
            flat, event = future.result()
        except BaseException as exc:
            if not self.is_permanent(uid):  # the job's device reservation is not used by anyone
                self.budgets["device"].release(working_bytes(self.units[uid], self.compute_dtype))
            self.health.fail(exc)
            raise
        self.device.wait_event(event)  # the compute stream waits for the copy lane's fetch
        if res.flat is None:
            res.flat = flat
            self.device.hand_over(flat)  # allocated on the copy lane, read by compute kernels
            self.attach(uid)

    def update_now(self, uid: int) -> None:
        """Apply the unit's recorded updates without bringing its weights to the device."""
        res = self.of[uid]
        if res.fetch is not None:
            self.finish_fetch(uid)
        if res.pending:
            pending, res.pending = res.pending, []
            with self.health.marks_failure():
                if self.is_permanent(uid) and self.device.is_cuda:
                    self._apply_on_compute(uid, pending)
                else:  # on the copy lane: the current stream waits before it reads the arrays
                    _, event = self.transfer.submit(self._fetch_job, uid, pending, False).result()
                    self.device.wait_event(event)

    def _apply_on_compute(self, uid: int, pending: list) -> None:
        """AdamW of device-homed state, queued on the current (compute) stream: it follows the
        gradients and the clip coefficient it reads on the same stream."""
        with self.events.span("update", self.units[uid].name, 28 * sum(u.slot.numel for u in pending)):
            apply_updates(self.io, self.device, self.states[uid], pending)

    def _reserve_update_scratch(self, uid: int, pending: list) -> int:
        """Elements per device scratch buffer for running this unit's AdamW on the GPU (see
        `update_on`), reserved from the device budget; 0: the update runs on the CPU."""
        unit = self.units[uid]
        planned = self.plan.device_updates
        if not (self.device.is_cuda and planned and planned[uid]) or not pending or len(pending) != len(unit.slots):
            return 0
        numel = min(max(u.slot.numel for u in pending), SCRATCH_ELEMENTS)
        # Only from free room: the plan reserves none for it, and neither waiting for memory
        # nor evicting cached weights is worth it; without room the update runs on the CPU.
        return numel if self.budgets["device"].try_reserve(scratch_bytes(numel)) else 0

    def _fetch_job(self, uid: int, pending: list, copy: bool, scratch_numel: int = 0):
        """Transfer thread: apply recorded AdamW updates, then copy weights to the device, all
        on the copy lane. Returns (device buffer, event the compute stream waits for).

        When the updates cover every parameter of the unit, the updated windows are copied
        to the device as they are produced, so the weights are not read a second time."""
        unit, state, res = self.units[uid], self.states[uid], self.of[uid]
        # The host arrays are about to be rewritten: the last copy that read them must be done.
        self.device.synchronize_event(res.copied)
        try:
            with self.device.lane("copy"):
                for event in {id(u.gate): u.gate.ready for u in pending if u.gate is not None}.values():
                    self.device.wait_event(event)  # the gradients and clip coefficient it reads
                # Allocated on the copy lane (and handed over to compute when attached), so the
                # allocator never refills memory that queued compute kernels may still read.
                flat = self._device_buffer(unit.numel) if copy else None
                self._apply_fetched_updates(uid, pending, flat, scratch_numel)
                if not copy:  # only the update: the caller's stream waits for it
                    return self.device_view(uid), self.device.record_event()
                moved = flat.numel() * flat.element_size()
                if unit.weights is not None:  # compressed: its bytes come, dequantized on the device
                    with self.events.span("fetch", unit.name, moved):
                        moved = self.packed.fetch_into(state, unit, flat)
                elif not (pending and len(pending) == len(unit.slots)):
                    with self.events.span("fetch", unit.name, moved):
                        self.io.read_into(state, "weights" if "weights" in state.arrays else "master", flat)
                event = self.device.record_event()
        finally:
            if scratch_numel:  # apply_updates synchronised (or failed): the scratch is free
                self.budgets["device"].release(scratch_bytes(scratch_numel))
        res.copied = event  # (only this thread reads it, before the unit's next update)
        if not scratch_numel:  # (a GPU-side update counted its own copies)
            self.count("host_to_device", moved)
        return flat, event

    def _apply_fetched_updates(self, uid: int, pending: list, flat, scratch_numel: int) -> None:
        """The AdamW updates of a fetch job, on the GPU through scratch buffers when reserved;
        updated windows go straight into `flat` when the updates cover the whole unit."""
        if not pending:
            return
        unit, n = self.units[uid], sum(u.slot.numel for u in pending)
        covered = len(pending) == len(unit.slots)
        with self.events.span("update", unit.name, 28 * n):
            scratch = [self.device.empty(scratch_numel, torch.float32)
                       for _ in range(SCRATCH_BUFFERS)] if scratch_numel else None
            apply_updates(self.io, self.device, self.states[uid], pending, flat if covered else None, scratch)
        if scratch_numel:
            self.count("host_to_device", 16 * n)
            self.count("device_to_host", 12 * n)

    # ---- device memory -------------------------------------------------------------------------
    def reserve_device(self, nbytes: int, what: str, required: bool, ahead: int | None = None) -> bool:
        """Reserve device bytes, evicting cached units (`victims(ahead)`); a required reservation
        also waits for in-flight fetches and gradients to free memory, and fails with BudgetError."""
        budget = self.budgets["device"]
        while True:
            if budget.try_reserve(nbytes):
                return True
            if self._evict_for(nbytes, ahead):
                continue
            if not required:
                return False
            if any(reclaim(nbytes) for reclaim in self.reclaimers):
                continue
            inflight = [uid for uid, res in enumerate(self.of) if res.fetch is not None]
            if not inflight:
                break
            furthest = inflight[-1] if self.next_use is None else max(inflight, key=self.next_use)
            self.finish_fetch(furthest)  # the furthest prefetch becomes evictable
        # Gradients in flight free device memory as the drain thread writes them out.
        budget.reserve(nbytes, what, wait=BUDGET_WAIT_S)
        return True

    def _evict_for(self, nbytes: int, ahead: int | None) -> bool:
        """Evict cached units (`victims(ahead)`) until `nbytes` fit; True if any went."""
        budget = self.budgets["device"]
        evicted = self.spares.drop_until(nbytes)
        for drop in self.idle_droppers:
            evicted = drop(nbytes) or evicted
        for uid in self.victims(ahead):
            if budget.room() >= nbytes:
                break
            self.evict(uid)
            evicted = True
        return evicted

    def victims(self, ahead: int | None) -> list[int]:
        """Evictable units, the first to go first: the least recently used; during generation
        for a prefetch of unit `ahead` only units needed after it (ring_eviction_order)."""
        candidates = [uid for uid in sorted(self._owner.values()) if self._evictable(uid)]
        if self.next_use is None:
            return eviction_order(candidates, lambda u: self.of[u].last_use)
        return ring_eviction_order(candidates, self.next_use, lambda u: self.of[u].last_use,
                                   None if ahead is None else self.next_use(ahead))

    def _evictable(self, uid: int) -> bool:
        res = self.of[uid]
        return (res.refs == 0 and res.fetch is None and res.flat is not None
                and not self.is_permanent(uid) and not (self.dist and self.dist.is_gathered(uid)))

    def evict(self, uid: int) -> None:
        """Drop the unit's device copy (its home keeps the state)."""
        flat = self._detach(uid)
        kept = self.spares.keep(flat)  # a spare keeps its own bytes (not a compressed unit's extra ones)
        self.budgets["device"].release(working_bytes(self.units[uid], self.compute_dtype)
                                       - (flat.numel() * flat.element_size() if kept else 0))

    def _detach(self, uid: int) -> torch.Tensor:
        """Point the unit's parameters away from its device buffer and return the buffer (its
        bytes stay reserved in the device budget)."""
        res = self.of[uid]
        if self.dist is not None:
            self.dist.forget(uid)
        for slot in self.units[uid].slots:
            slot.param.data = self.placeholder(slot)
        self._owner.pop(res.flat.untyped_storage().data_ptr(), None)
        flat, res.flat = res.flat, None
        return flat

    def _device_buffer(self, numel: int) -> torch.Tensor:
        """A buffer for a fetch: a spare one of the same size (CPU) or a new one (current lane)."""
        flat = self.spares.take(numel)
        return flat if flat is not None else self.device.empty(numel, self.compute_dtype)

    # ---- parameters -----------------------------------------------------------------------------
    def placeholder(self, slot: Slot) -> torch.Tensor:
        """Right shape and dtype, one element of memory (NaN, so misuse shows). Autograd and
        model code that reads `.shape` keep working while the data lives in another tier."""
        return self.device.placeholder(self.compute_dtype).expand(slot.shape)

    def attach(self, uid: int) -> None:
        """Point every parameter of the unit at its slice of the device buffer."""
        flat = self.of[uid].flat
        for slot in self.units[uid].slots:
            slot.param.data = flat[slot.offset:slot.offset + slot.numel].view(slot.shape)
        if not self.is_permanent(uid):
            self._owner[flat.untyped_storage().data_ptr()] = uid

    def attach_permanent(self) -> None:
        """Detach every parameter from its original data; device-resident units point at their
        state for good (the device buffer is the state itself)."""
        for unit in self.units:
            for slot in unit.slots:
                slot.param.data = self.placeholder(slot)
            if self.is_permanent(unit.uid):
                self.of[unit.uid].flat = self.device_view(unit.uid)
                self.attach(unit.uid)

    def device_view(self, uid: int) -> torch.Tensor:
        state = self.states[uid]
        return state.arrays["weights"] if "weights" in state.arrays else state.arrays["master"]

    def close(self) -> None:
        self.transfer.shutdown(wait=True)
        self.packed.close()
        self.updater.shutdown(wait=True)
        if self.dist is not None:  # no all-gather left in flight when the ranks tear down
            for uid in range(len(self.units)):
                try:
                    self.dist.forget(uid)
                except TierflowError:  # another rank died: the group is broken anyway
                    break


def scratch_bytes(numel: int) -> int:
    """Device bytes of a GPU-side AdamW's scratch buffers of `numel` fp32 elements each."""
    return SCRATCH_BUFFERS * numel * 4
