"""The engine: owns the tiers, moves units to the device ahead of use, drains gradients.

Life of a unit during a training step (see DESIGN.md):

1. forward: the hook of the first module that needs it acquires it. If it was
   prefetched the data is already there; otherwise it is fetched now. Any AdamW
   update recorded by the last `opt.step()` is applied first, in the fetch job,
   so updates overlap the forward compute of earlier units.
2. after the module's forward the unit is released; it stays cached on the
   device while the budget allows (least recently used is evicted first).
3. backward: autograd's saved views of the unit are tokens; unpacking one
   acquires the unit again (prefetching the units before it in forward order).
4. each gradient leaves the device as soon as autograd has accumulated it and is
   added to the unit's fp32 gradient in its home tier by the drain thread, which
   also records its norm (for exact global-norm clipping without another pass).

All bookkeeping runs on the thread that runs forward/backward; the transfer
thread and the drain thread only move and compute data.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from tierflow.core import figures

from tierflow.dist import ranks as distributed

from tierflow.runtime import hooks
from tierflow.memory.budget import Budget
from tierflow.config import OffloadConfig
from tierflow.memory.device import ComputeDevice
from tierflow.errors import BudgetError, ConfigError, EngineFailedError, NonFiniteError, TierflowError
from tierflow.runtime.events import EventLog, Span
from tierflow.runtime.gradients import GradientSink
from tierflow.core.layout import Slot, Unit, partition
from tierflow.runtime.updates import PendingUpdate, apply_updates
from tierflow.core.cost import DEFAULT_BATCH_SHAPE, workload
from tierflow.core.plan import DRAIN_BUFFERS, Placement, device_capacity, working_bytes
from tierflow.core.planner import choose_placement
from tierflow.core.schedule import eviction_order, prefetch_window
from tierflow.memory.nvme import NvmeStore
from tierflow.memory.pool import BufferPool
from tierflow.memory.tiers import ARRAY_CLASS, FP32, StateIO, UnitState
from tierflow.core.trace import Trace

SCRATCH_ELEMENTS = 1 << 22  # per device buffer of a GPU-side AdamW of host/NVMe state (4 x 16 MiB)
SCRATCH_BUFFERS = 4         # master, gradient and both moments, fp32
BUDGET_WAIT_S = 120.0  # how long a fetch waits for in-flight gradients to free device memory


@dataclass
class Residency:
    """Runtime state of one unit on the compute device."""

    flat: torch.Tensor | None = None       # device buffer holding the unit's weights
    fetch: Future | None = None            # in-flight fetch (result: (flat, event))
    refs: int = 0                          # modules / backward currently using it
    last_use: int = 0                      # tick of the last acquire (LRU)
    pending: list = field(default_factory=list)  # PendingUpdates not yet applied
    grads_left: int = 0                    # trainable slots whose gradient is still expected
    copied: object = None                  # event: the last async copy reading its host arrays


class Engine:
    """A model whose training state is tiered across device, host and NVMe.

    Create it with `tierflow.offload`. Call it like the model.
    """

    def __init__(self, model: nn.Module, cfg: OffloadConfig, placement: str = "auto", source=None):
        """`source`: optional callable (parameter name) -> tensor giving each parameter's initial
        value (e.g. read from a checkpoint or safetensors shard, one tensor at a time); the
        model's parameters may then be on the meta device."""
        self.module = model
        self.cfg = cfg
        self.device = ComputeDevice(cfg.device)
        self.param_dtype = _model_dtype(model)
        self.compute_dtype = cfg.dtype or self.param_dtype
        self.budgets = {"device": Budget("device", device_capacity(cfg)), "host": Budget("host", cfg.host_memory)}
        self.events = EventLog()  # engine.events.enable() records spans and memory for timelines
        for budget in self.budgets.values():
            budget.listener = self.events.budget_changed
        if source is not None:
            self._replace_meta_parameters()
        unit_bytes = cfg.unit_bytes or _default_unit_bytes(cfg, model)
        self.dist = distributed.detect()  # data-parallel ranks sharing the state, or None
        buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
        self.tiled, self._untile = {}, []  # linear layers run in tiles (tiling.py) and how to undo it
        try:
            hooked = self._partition_and_plan(model, unit_bytes, source, buffer_bytes, placement)
        except BudgetError:
            if not self._tile_oversized(model, unit_bytes, source):
                raise
            try:  # a linear layer too big for the device: try again with it in tiles
                hooked = self._partition_and_plan(model, unit_bytes, source, buffer_bytes, placement)
            except BaseException:
                self._restore_untiled()
                raise
        self.param_owner = {id(s.param): u.uid for u in self.units for s in u.slots}
        try:
            self.nvme = self._open_nvme()
        except BaseException:
            self._restore_untiled()
            raise
        try:
            self._setup(model, source, buffer_bytes, hooked)
        except BaseException:
            if self.nvme is not None:
                self.nvme.close()  # removes the spill file
            self._restore_untiled()
            raise

    def _setup(self, model, source, buffer_bytes, hooked) -> None:
        """Everything after the plan: pools, state in its tiers, threads, hooks."""
        self._pools = self._make_pools()
        self.io = StateIO(self.device, self.budgets, self.nvme,
                          self._pools[0] if self._pools else None)
        self._drain_io = StateIO(self.device, self.budgets, self.nvme,
                                 self._pools[1] if self._pools else None)
        self._move_buffers(buffer_bytes)
        self._storage_owner: dict[int, int] = {}  # data_ptr of a device buffer -> unit id
        self._busy = 0                             # >0 while engine code runs (hooks off)
        self.states: list[UnitState] = []
        self.residency = [Residency() for _ in self.units]
        self._load_state(source)
        self.trace = Trace()
        self._tick = itertools.count(1)
        self._lock = threading.RLock()
        self._transfer = ThreadPoolExecutor(1, thread_name_prefix="tierflow-transfer")
        self.grads = GradientSink(self._drain_io, self.budgets["device"], self.device, self._count,
                                  self.events, self.dist, self.units)
        self._scopes: list[list[int]] = []
        self._module_starts: list[float] = []
        self._backward_holds: set[int] = set()
        self._backward_callback_queued = False
        self._steps: dict[int, int] = {}          # slot index -> AdamW steps taken
        self._counters = {"host_to_device": 0, "device_to_host": 0}
        self._counter_lock = threading.Lock()
        self._optimizer = None
        self._closed = False
        self._failure: BaseException | None = None  # the first failed job: no training or saving after it
        self._last_step = None                      # (StepGate, slot indices) of the last recorded step
        self.skipped_steps = 0                      # optimizer steps skipped for non-finite gradients
        # With every unit's weights permanently on the device nothing is ever fetched: the
        # per-op on-demand check (a Python call per torch op, costly on a GPU) is skipped and
        # updates are applied when a forward begins instead.
        self.fetches_on_demand = not all(self._is_permanent(uid) for uid in range(len(self.units)))
        # Generation (infer.py) runs the same forward again and again: the units after the last
        # one are the next forward's first, so prefetch wraps around to them.
        self.cyclic_prefetch = False
        # CPU only: buffers of evicted units, reused by the next fetches of the same size.
        # Fresh memory costs a page fault per 4 KiB: measured ~3x the copy itself.
        self._spare: dict[int, list[torch.Tensor]] = {}
        self._handles = hooks.install(self, model, hooked)
        self.activations = None  # an ActivationManager when cfg.activations asks for one
        if self.cfg.activations is not None:
            from tierflow.runtime.activations import ActivationManager
            self.activations = ActivationManager(self, model, hooked, self.cfg.activations)

    # ---- construction -----------------------------------------------------------------
    def _replace_meta_parameters(self) -> None:
        """Meta parameters cannot take real data: swap in placeholder parameters (same shape,
        same requires_grad; tied parameters stay tied)."""
        replaced: dict[int, nn.Parameter] = {}
        for module in self.module.modules():
            for name, param in module._parameters.items():
                if param is None or param.device.type != "meta":
                    continue
                if id(param) not in replaced:
                    base = self.device.placeholder(self.compute_dtype).expand(param.shape)
                    replaced[id(param)] = nn.Parameter(base, requires_grad=param.requires_grad)
                module._parameters[name] = replaced[id(param)]

    def _partition_and_plan(self, model, unit_bytes, source, buffer_bytes, placement):
        """Units and their placement; returns the modules to hook."""
        world = self.dist.world if self.dist else 1
        self.units, hooked = partition(model, unit_bytes, allow_meta=source is not None, world_size=world)
        self.plan: Placement = choose_placement(
            self.units, self.cfg, self.compute_dtype, buffer_bytes,
            workload(model, self.units, *(self.cfg.batch_shape or DEFAULT_BATCH_SHAPE), self.compute_dtype),
            figures.for_planning(self.cfg.device.type, self.compute_dtype), placement, world)[0]
        return hooked

    def _tile_oversized(self, model, unit_bytes: int, source) -> bool:
        """Put linear layers too big for the device budget in tiles (tiling.py); True if any."""
        cap = device_capacity(self.cfg)
        if cap is None or source is not None:  # `source` reads parameters by their names
            return False
        from tierflow.core.tiling import tile_oversized
        self.tiled, self._untile = tile_oversized(model, cap // 4, unit_bytes, self.compute_dtype)
        return bool(self.tiled)

    def _restore_untiled(self) -> None:
        """A failed offload leaves the model as it was."""
        for parent, leaf, module in self._untile:
            setattr(parent, leaf, module)
        self.tiled, self._untile = {}, []

    def _open_nvme(self) -> NvmeStore | None:
        if not self.plan.uses_nvme:
            if self.cfg.activations is not None and self.cfg.nvme is not None:
                # Activations may spill there: an unusable directory must fail now, before the
                # model's parameters move into the tiers, not after (the model would be lost).
                NvmeStore(self.cfg.nvme, io_threads=1, direct=self.cfg.direct_io,
                          file_name=f"tierflow-probe-{os.getpid()}-{secrets.token_hex(4)}.bin").close()
            return None
        # One spill file per engine: engines sharing a directory never touch each other's state.
        name = f"tierflow-spill-{os.getpid()}-{secrets.token_hex(4)}.bin"
        store = NvmeStore(self.cfg.nvme, io_threads=self.cfg.io_threads, direct=self.cfg.direct_io,
                          file_name=name)
        try:
            store.check_space(self.plan.tier_bytes["nvme"])
        except BaseException:
            store.close()
            raise
        return store

    def _make_pools(self):
        if self.nvme is None:
            return None
        self.budgets["host"].reserve(self.plan.staging_bytes, "the NVMe staging buffers")
        pin = self.device.is_cuda
        return (BufferPool(self.cfg.staging_buffers, self.cfg.chunk_bytes, pin=pin),
                BufferPool(DRAIN_BUFFERS, self.cfg.chunk_bytes, pin=pin))

    def _move_buffers(self, buffer_bytes: int) -> None:
        """Buffers are small: they live on the device for good."""
        self.budgets["device"].reserve(buffer_bytes, "the model's buffers")
        for module in self.module.modules():
            for name, buf in module._buffers.items():
                if buf is not None and buf.device != self.device.device:
                    module._buffers[name] = buf.to(self.device.device)

    def _load_state(self, source) -> None:
        """Copy each parameter (or its value from `source`) into its unit's home tier. Only once
        every unit is in place are the originals freed: a failure (disk full...) loses nothing."""
        for unit, home in zip(self.units, self.plan.homes):
            shard = self.dist.shard(unit.numel) if self.dist else None
            state = self.io.allocate(unit, home, self.compute_dtype, shard)
            self.states.append(state)
            for slot in unit.slots:
                data = slot.param.detach() if source is None else _checked(source(slot.name), slot)
                data = data.reshape(-1)
                if "master" in state.arrays:
                    self.io.write_from(state, "master", data.to(FP32), slot.offset)
                if "weights" in state.arrays:
                    self.io.write_from(state, "weights", data.to(self.compute_dtype), slot.offset)
        for unit, home in zip(self.units, self.plan.homes):
            for slot in unit.slots:
                slot.param.data = self._placeholder(slot)
            if self._is_permanent(unit.uid):  # weights stay put: the device buffer is the state itself
                self.residency[unit.uid].flat = self._device_view(unit.uid)
                self._attach(unit.uid)

    def _device_view(self, uid: int) -> torch.Tensor:
        state = self.states[uid]
        return state.arrays["weights"] if "weights" in state.arrays else state.arrays["master"]

    @contextlib.contextmanager
    def _engine_code(self):
        """Serialise bookkeeping and switch the on-demand fetch hook off inside it."""
        with self._lock:
            self._busy += 1
            try:
                yield
            finally:
                self._busy -= 1

    # ---- calling the model --------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        self._check_usable()
        to_device = lambda x: x.to(self.device.device, non_blocking=True) if isinstance(x, torch.Tensor) else x
        args = tuple(to_device(a) for a in args)
        kwargs = {k: to_device(v) for k, v in kwargs.items()}
        return self.module(*args, **kwargs)

    def __getattr__(self, name):
        # Everything else (generate, config, train/eval, ...) is the model's.
        if name == "module":
            raise AttributeError(name)
        return getattr(self.module, name)

    def begin_forward(self) -> None:
        if not self.fetches_on_demand and not self._scopes:
            self._apply_device_updates()
        if self.activations is not None:
            self.activations.begin_forward()
        self.trace.begin()
        self._scopes.append([])

    def _apply_device_updates(self) -> None:
        """Apply every recorded update now, in use order (all units live on the device)."""
        with self._engine_code():
            queued = [uid for uid in sorted(range(len(self.units)), key=self.trace.position)
                      if self.residency[uid].pending and self._start_fetch(uid, required=True)]
            for uid in queued:
                self._finish_fetch(uid)

    def end_forward(self) -> None:
        with self._engine_code():
            for uid in self._scopes.pop():
                self.release(uid)
            self.trace.end()
            if self.activations is not None:
                self.activations.end_forward()

    def enter_module(self, uids: list[int]) -> None:
        self._module_starts.append(self.events.now())
        with self._engine_code():
            for uid in sorted(uids, key=self.trace.position):
                self.trace.record(uid)
                self.acquire(uid)
            if self.activations is None or not self.activations.recomputing:  # not in backward
                upcoming = self._upcoming(max(uids, key=self.trace.position))
                self._prefetch(upcoming)
                self._gather_ahead(self.trace.after(max(uids, key=self.trace.position)))
            self._scopes.append([])

    def _upcoming(self, uid: int) -> list[int]:
        """Units used after `uid` in forward order (then, when cyclic, the next forward's)."""
        after = self.trace.after(uid)
        position = self.trace.position(uid)
        if self.cyclic_prefetch and position < len(self.trace.order):
            after = after + self.trace.order[:position]
        return after

    def exit_module(self, uids: list[int]) -> None:
        with self._engine_code():
            for uid in self._scopes.pop():
                self.release(uid)
            for uid in uids:
                self.release(uid)
        start = self._module_starts.pop()
        if self.events.enabled:
            self.events.add(Span("forward", self.units[uids[0]].name, start, self.events.now(), 0, "main"))

    def ensure_resident(self, uid: int) -> None:
        """On-demand fetch of a parameter used outside its module (held until the scope ends)."""
        with self._engine_code():
            res = self.residency[uid]
            if res.flat is not None and res.fetch is None and not res.pending and (
                    self.dist is None or res.refs):  # ranks: only a held unit is gathered
                return
            self.trace.record(uid)
            self.acquire(uid)
            self._scopes[-1].append(uid)

    # ---- residency ----------------------------------------------------------------------
    def acquire(self, uid: int) -> torch.Tensor:
        """Make unit `uid` resident on the device and hold it; returns its flat buffer."""
        res = self.residency[uid]
        if res.flat is None and res.fetch is None:
            self._start_fetch(uid, required=True)
        if res.fetch is not None:
            self._finish_fetch(uid)
        elif res.pending:  # a device-resident unit with an update still to apply
            self._start_fetch(uid, required=True)
            self._finish_fetch(uid)
        res.refs += 1
        res.last_use = next(self._tick)
        if self.dist is not None and res.refs == 1:
            # Every rank takes its first hold of a unit at the same point of the model, so
            # the all-gathers line up (cached copies are re-gathered: deterministic, not lazy).
            state = self.states[uid]
            self.dist.gather(uid, res.flat, state.base, state.limit, self.units[uid].name)
        return res.flat

    def _gather_ahead(self, upcoming: list[int]) -> None:
        """Distributed: start the all-gather of the next unit in trace order while the current
        one computes. Decided from trace order and holds only, so every rank does the same."""
        if self.dist is None or not upcoming:
            return
        uid, res = upcoming[0], self.residency[upcoming[0]]
        if res.refs or self.dist.is_gathered(uid):
            return
        if res.fetch is None and (res.flat is None or res.pending):
            self._start_fetch(uid, required=True)
        if res.fetch is not None:
            self._finish_fetch(uid)
        state = self.states[uid]
        self.dist.gather_ahead(uid, res.flat, state.base, state.limit, self.units[uid].name)

    def release(self, uid: int) -> None:
        """Drop one hold; the unit stays cached until its device memory is needed."""
        res = self.residency[uid]
        res.refs -= 1
        assert res.refs >= 0, f"unit {self.units[uid].name} released more often than acquired"
        if self.dist is not None and res.refs == 0:
            self.dist.forget(uid)  # the next first hold gathers again

    def _is_permanent(self, uid: int) -> bool:
        """Device-homed units stay attached (one process: a rank's device-resident state is only
        its shard, the full weights are gathered). So do frozen host-homed units when the
        compute device is the CPU: host memory is device memory there, a copy would only cost time."""
        if self.dist is not None:
            return False
        home = self.plan.homes[uid]
        return home == "device" or (home == "host" and not self.device.is_cuda
                                    and not self.units[uid].trainable_numel)

    def _start_fetch(self, uid: int, required: bool) -> bool:
        """Queue the job that applies pending updates and fills the device buffer."""
        res = self.residency[uid]
        pending, res.pending = res.pending, []
        nbytes = 0 if self._is_permanent(uid) else working_bytes(self.units[uid], self.compute_dtype)
        what = f"the weights of unit '{self.units[uid].name}'"
        if nbytes and not self._reserve_device(nbytes, what, required):
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
                res.fetch.set_result((self._device_view(uid), None))
            return True
        scratch = self._reserve_update_scratch(uid, pending) if nbytes else 0
        res.fetch = self._transfer.submit(self._fetch_job, uid, pending, nbytes > 0, scratch)
        return True

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
        return numel if self.budgets["device"].try_reserve(_scratch_bytes(numel)) else 0

    def _update_now(self, uid: int) -> None:
        """Apply the unit's recorded updates without bringing its weights to the device."""
        res = self.residency[uid]
        if res.fetch is not None:
            self._finish_fetch(uid)
        if res.pending:
            pending, res.pending = res.pending, []
            with self._marks_failure():
                if self._is_permanent(uid) and self.device.is_cuda:
                    self._apply_on_compute(uid, pending)
                else:  # on the copy lane: the current stream waits before it reads the arrays
                    _, event = self._transfer.submit(self._fetch_job, uid, pending, False).result()
                    self.device.wait_event(event)

    def _apply_on_compute(self, uid: int, pending: list) -> None:
        """AdamW of device-homed state, queued on the current (compute) stream: it follows the
        gradients and the clip coefficient it reads on the same stream."""
        with self.events.span("update", self.units[uid].name, 28 * sum(u.slot.numel for u in pending)):
            apply_updates(self.io, self.device, self.states[uid], pending)

    def _finish_fetch(self, uid: int) -> None:
        res = self.residency[uid]
        future, res.fetch = res.fetch, None
        try:
            flat, event = future.result()
        except BaseException as exc:
            if not self._is_permanent(uid):  # the job's device reservation is not used by anyone
                self.budgets["device"].release(working_bytes(self.units[uid], self.compute_dtype))
            self._fail(exc)
            raise
        self.device.wait_event(event)  # the compute stream waits for the copy lane's fetch
        if res.flat is None:
            res.flat = flat
            self.device.hand_over(flat)  # allocated on the copy lane, read by compute kernels
            self._attach(uid)

    def _fetch_job(self, uid: int, pending: list, copy: bool, scratch_numel: int = 0):
        """Transfer thread: apply recorded AdamW updates, then copy weights to the device, all
        on the copy lane. Returns (device buffer, event the compute stream waits for).

        When the updates cover every parameter of the unit, the updated windows are copied
        to the device as they are produced, so the weights are not read a second time."""
        unit, state, res = self.units[uid], self.states[uid], self.residency[uid]
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
                    return self._device_view(uid), self.device.record_event()
                if not (pending and len(pending) == len(unit.slots)):
                    with self.events.span("fetch", unit.name, flat.numel() * flat.element_size()):
                        self.io.read_into(state, "weights" if "weights" in state.arrays else "master", flat)
                event = self.device.record_event()
        finally:
            if scratch_numel:  # apply_updates synchronised (or failed): the scratch is free
                self.budgets["device"].release(_scratch_bytes(scratch_numel))
        res.copied = event  # (only this thread reads it, before the unit's next update)
        if not scratch_numel:  # (a GPU-side update counted its own copies)
            self._count("host_to_device", flat.numel() * flat.element_size())
        return flat, event

    def _device_buffer(self, numel: int) -> torch.Tensor:
        """A buffer for a fetch: a spare one of the same size (CPU) or a new one (current lane)."""
        flat = self._spare_buffer(numel)
        return flat if flat is not None else self.device.empty(numel, self.compute_dtype)

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
            self._count("host_to_device", 16 * n)
            self._count("device_to_host", 12 * n)

    def _reserve_device(self, nbytes: int, what: str, required: bool) -> bool:
        """Reserve device bytes, evicting cached units; a required reservation also waits for
        in-flight fetches and gradients to free memory, and fails with BudgetError."""
        budget = self.budgets["device"]
        while True:
            if budget.try_reserve(nbytes):
                return True
            if self._evict_for(nbytes):
                continue
            if not required:
                return False
            inflight = [uid for uid, res in enumerate(self.residency) if res.fetch is not None]
            if not inflight:
                break
            self._finish_fetch(inflight[-1])  # the furthest prefetch becomes evictable
        # Gradients in flight free device memory as the drain thread writes them out.
        budget.reserve(nbytes, what, wait=BUDGET_WAIT_S)
        return True

    def _evict_for(self, nbytes: int) -> bool:
        """Evict cached units, least recently used first, until `nbytes` fit; True if any went."""
        budget = self.budgets["device"]
        candidates = [uid for uid, res in enumerate(self.residency)
                      if res.refs == 0 and res.fetch is None and res.flat is not None
                      and not self._is_permanent(uid) and not (self.dist and self.dist.is_gathered(uid))]
        evicted = self._drop_spares(nbytes)
        for uid in eviction_order(candidates, lambda u: self.residency[u].last_use):
            if budget.room() >= nbytes:
                break
            self._evict(uid)
            evicted = True
        return evicted

    def _evict(self, uid: int) -> None:
        res = self.residency[uid]
        if self.dist is not None:
            self.dist.forget(uid)
        for slot in self.units[uid].slots:
            slot.param.data = self._placeholder(slot)
        self._storage_owner.pop(res.flat.untyped_storage().data_ptr(), None)
        flat, res.flat = res.flat, None
        if not self._keep_spare(flat):
            self.budgets["device"].release(working_bytes(self.units[uid], self.compute_dtype))

    def _keep_spare(self, flat: torch.Tensor) -> bool:
        """Keep an evicted CPU buffer for reuse when nothing else holds a view of it (the storage
        is referenced by `flat` and the temporary wrapper only). A spare stays in the device
        budget until a fetch takes it or room is needed (`_drop_spares`); at most two per size
        and no more bytes in all than the prefetch window. True if kept."""
        use_count = getattr(torch._C, "_storage_Use_Count", None)
        if self.device.is_cuda or use_count is None or use_count(flat.untyped_storage()._cdata) > 2:
            return False
        spares = self._spare.setdefault(flat.numel(), [])
        held = sum(t.numel() * t.element_size() for group in list(self._spare.values()) for t in list(group))
        if len(spares) < 2 and held + flat.numel() * flat.element_size() <= self.plan.prefetch_bytes:
            spares.append(flat)
            return True
        return False

    def _spare_buffer(self, numel: int) -> torch.Tensor | None:
        """A spare buffer of `numel` elements (transfer thread; list.pop is atomic); its bytes
        leave the budget, since the fetch taking it has reserved its own."""
        try:
            flat = self._spare.get(numel, []).pop()
        except IndexError:
            return None
        self.budgets["device"].release(flat.numel() * flat.element_size())
        return flat

    def _drop_spares(self, nbytes: int) -> bool:
        """Free spare buffers until `nbytes` fit in the device budget; True if any went."""
        budget, dropped = self.budgets["device"], False
        for numel in list(self._spare):
            while budget.room() < nbytes and self._spare_buffer(numel) is not None:
                dropped = True
        return dropped

    def _placeholder(self, slot: Slot) -> torch.Tensor:
        """Right shape and dtype, one element of memory (NaN, so misuse shows). Autograd and
        model code that reads `.shape` keep working while the data lives in another tier."""
        return self.device.placeholder(self.compute_dtype).expand(slot.shape)

    def _attach(self, uid: int) -> None:
        """Point every parameter of the unit at its slice of the device buffer."""
        flat = self.residency[uid].flat
        for slot in self.units[uid].slots:
            slot.param.data = flat[slot.offset:slot.offset + slot.numel].view(slot.shape)
        if not self._is_permanent(uid):
            self._storage_owner[flat.untyped_storage().data_ptr()] = uid

    def _prefetch(self, upcoming: list[int]) -> None:
        size = lambda u: working_bytes(self.units[u], self.compute_dtype)
        needs = lambda u: (self.residency[u].fetch is None
                           and (self.residency[u].flat is None or bool(self.residency[u].pending)))
        for uid in prefetch_window(upcoming, size, needs, self.plan.prefetch_bytes):
            if not self._start_fetch(uid, required=False):
                return

    # ---- backward -----------------------------------------------------------------------
    def pack_saved(self, tensor: torch.Tensor):
        if tensor.layout != torch.strided or tensor.device != self.device.device:
            return tensor
        uid = self._storage_owner.get(tensor.untyped_storage().data_ptr())
        if uid is None and self.activations is not None:
            return self.activations.pack(tensor)  # an activation: keep, offload (activations.py)
        if uid is None or tensor.dtype != self.compute_dtype:
            return tensor
        return hooks.SavedUnitView(uid, tensor.size(), tensor.stride(), tensor.storage_offset())

    def unpack_saved(self, saved):
        if not isinstance(saved, hooks.SavedUnitView):
            return saved if self.activations is None else self.activations.unpack(saved)
        with self._engine_code():
            self._queue_backward_callback()
            uid = saved.uid
            if uid not in self._backward_holds:
                self._backward_holds.add(uid)
                self.acquire(uid)
                self.residency[uid].grads_left = sum(s.trainable for s in self.units[uid].slots)
                self._prefetch(self.trace.before(uid))
                self._gather_ahead(self.trace.before(uid))
            flat = self.residency[uid].flat
        return flat.as_strided(saved.size, saved.stride, saved.offset)

    def on_grad(self, unit: Unit, slot: Slot, param: nn.Parameter) -> None:
        """A gradient is complete for this backward: send it to the unit's home tier."""
        grad, param.grad = param.grad, None
        with self._engine_code():
            self._queue_backward_callback()
            res = self.residency[unit.uid]
            if res.pending:  # an update from the last step still reads the old gradient
                self._update_now(unit.uid)
            nbytes = grad.numel() * grad.element_size()
            self._reserve_device(nbytes, f"the gradient of {slot.name}", required=True)
            self.grads.submit(self.states[unit.uid], slot, grad, nbytes)
            if unit.uid in self._backward_holds:
                res.grads_left -= 1
                if res.grads_left == 0:
                    self._backward_holds.discard(unit.uid)
                    self.release(unit.uid)

    def _queue_backward_callback(self) -> None:
        if not self._backward_callback_queued:
            self._backward_callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)

    def _end_backward(self) -> None:
        with self._engine_code():
            for uid in self._backward_holds:
                self.release(uid)
            self._backward_holds.clear()
            self._backward_callback_queued = False

    def wait_for_gradients(self) -> None:
        """Block until every gradient has reached its tier (errors surface here)."""
        with self._marks_failure():
            self.grads.wait()

    # ---- optimizer --------------------------------------------------------------------
    def attach_optimizer(self, optimizer) -> None:
        if self._optimizer is not None and self._optimizer is not optimizer:
            raise ConfigError("this engine already has an optimizer")
        known = set(self.param_owner)
        for group in optimizer.param_groups:
            for param in group["params"]:
                if id(param) not in known:
                    raise ConfigError("the optimizer was given a parameter that is not part of the "
                                      "engine's model")
        self._optimizer = optimizer

    def zero_grad(self) -> None:
        with self._marks_failure():
            self.grads.zero()

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False) -> torch.Tensor:
        """Global gradient norm over all tiers, computed as torch.nn.utils.clip_grad_norm_ does."""
        self._check_usable()
        with self._marks_failure():
            return self.grads.clip(max_norm, norm_type, error_if_nonfinite)

    def queue_step(self, hyper_params: dict) -> None:
        """Record an AdamW update for every parameter with a gradient; applied lazily."""
        self._check_usable()
        self.wait_for_gradients()
        with self._engine_code():
            self._check_last_step()
            chosen = [(unit, [slot for slot in unit.slots if slot.trainable and slot.index in self.grads.has_grad
                              and id(slot.param) in hyper_params]) for unit in self.units]
            chosen = [(unit, slots) for unit, slots in chosen if slots]
            if any(self.residency[unit.uid].refs for unit, _ in chosen):
                raise TierflowError("opt.step() was called while a forward or backward pass is "
                                    "still using the parameters")
            gate = self.grads.gate() if chosen else None  # clip coefficient and finiteness
            stepped = []
            for unit, slots in chosen:
                updates = []
                for slot in slots:
                    step = self._steps.get(slot.index, 0) + 1
                    self._steps[slot.index] = step
                    stepped.append(slot.index)
                    updates.append(PendingUpdate(slot, hyper_params[id(slot.param)], step, gate.scale, gate))
                res = self.residency[unit.uid]
                self._update_now(unit.uid)  # two steps without a forward between: older one first
                if res.flat is not None and not self._is_permanent(unit.uid):
                    self._evict(unit.uid)  # its weights are about to change
                res.pending = updates
            self._last_step = (gate, stepped) if chosen else None
            self.grads.zero()
            # Start the first units' updates now, overlapped with whatever the caller does next.
            self._prefetch(self.trace.order)

    def _check_last_step(self) -> None:
        """Raise (or, with AdamW(skip_nonfinite=True), warn) if the last recorded step had
        non-finite gradients. Its updates were skipped on every lane (found_inf), so the state is
        that of the step before; the step counters are set back to match. Checked one step late,
        when its flag is long on the host: recording a step never waits for the GPU."""
        if self._last_step is None:
            return
        (gate, stepped), self._last_step = self._last_step, None
        if not gate.skipped():
            return
        for index in stepped:
            self._steps[index] -= 1
            if not self._steps[index]:
                del self._steps[index]
        self.skipped_steps += 1
        message = ("the gradients of the last optimizer step were not finite (NaN or inf): the step "
                   "was skipped, weights and AdamW state are those of the step before. Lower the "
                   "learning rate, check the data for bad batches, or (bf16/fp16) look for overflow")
        if self._optimizer is not None and getattr(self._optimizer, "skip_nonfinite", False):
            warnings.warn(message)
            return
        raise NonFiniteError(message + "; tierflow.AdamW(..., skip_nonfinite=True) skips such steps "
                                       "and trains on")

    def flush(self) -> None:
        """Apply every recorded update now (before reading or saving the state)."""
        self._check_usable()
        self.wait_for_gradients()
        with self._engine_code():
            for uid in range(len(self.units)):
                self._update_now(uid)
            self._check_last_step()

    # ---- failures -----------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        """A job failed: its step may be half applied, so nothing trains or saves from here on."""
        if self._failure is None and not isinstance(exc, NonFiniteError):
            self._failure = exc

    @contextlib.contextmanager
    def _marks_failure(self):
        try:
            yield
        except BaseException as exc:
            self._fail(exc)
            raise

    def _check_usable(self) -> None:
        if self._closed:
            raise TierflowError("this engine is closed")
        if self._failure is not None:
            raise EngineFailedError(
                f"an earlier transfer, update or gradient job failed ({type(self._failure).__name__}: "
                f"{self._failure}); the training state may be half-updated, so this engine no longer "
                f"trains or saves. Resume from the last checkpoint (tierflow.resume)") from self._failure

    # ---- reading and writing state ------------------------------------------------------
    def named_slots(self):
        """(unit, slot) for every parameter, in unit order; slot.name is the parameter name."""
        for unit in self.units:
            for slot in unit.slots:
                yield unit, slot

    def read_array(self, unit: Unit, slot: Slot, name: str = "master") -> torch.Tensor:
        """One parameter's slice of an array ('master', 'exp_avg', 'exp_avg_sq', 'grad'), as a
        new fp32 CPU tensor of the parameter's shape. Call `flush()` first for current values."""
        self._check_usable()
        out = torch.empty(slot.numel, dtype=FP32) if self.dist is None else torch.zeros(slot.numel, dtype=FP32)
        state = self.states[unit.uid]
        for start, count in self.io.pieces(state, slot.offset, slot.numel):
            window = self.io.open(state, (name,), start, count)
            try:
                out[start - slot.offset:start - slot.offset + count].copy_(window.views[0])
            finally:
                self.io.close(window)
        if self.dist is not None:  # every element is on exactly one rank: the sum assembles it
            self.dist.all_reduce_sum(out, f"all-reduce assembling {slot.name}")
        return out.view(slot.shape)

    def write_array(self, unit: Unit, slot: Slot, name: str, value: torch.Tensor) -> None:
        """Overwrite one parameter's slice of an array in its home tier (e.g. when resuming).
        Writing 'master' also refreshes the compute-dtype weights and drops device copies."""
        self.flush()
        value = _checked(value, slot).reshape(-1)
        state = self.states[unit.uid]
        with self._engine_code():
            res = self.residency[unit.uid]
            if res.refs:
                raise TierflowError("cannot overwrite state while a forward or backward pass uses it")
            self.device.synchronize_event(res.copied)  # no async copy still reads the host arrays
            # (a rank whose shard holds no trainable elements has no moment arrays: nothing to write)
            self.io.write_from(state, name, value.to(state.dtypes.get(state.key(name), FP32)), slot.offset)
            if name == "master" and "weights" in state.arrays:
                self.io.write_from(state, "weights", value.to(self.compute_dtype), slot.offset)
            if name == "master" and res.flat is not None and not self._is_permanent(unit.uid):
                self._evict(unit.uid)

    def iter_windows(self, unit: Unit, slot: Slot, names=("master",)):
        """Yield one parameter's arrays `names` window by window as CPU tensors (NVMe state through
        the staging buffers, the next window read ahead: one window in memory at a time). Call
        `flush()` first. Each yielded list is valid until the next one is asked for."""
        self._check_usable()
        state = self.states[unit.uid]
        for window in self.io.windows(state, tuple(names), self.io.pieces(state, slot.offset, slot.numel)):
            try:
                # A frozen unit's 'master' is its compute-dtype weights: callers get fp32 as usual.
                yield [view.cpu().to(FP32) if name == "master" else view.cpu()
                       for name, view in zip(names, window.views)]
            finally:
                self.io.close(window)

    @property
    def optimizer(self):
        """The tierflow.AdamW attached to this engine, or None."""
        return self._optimizer

    @property
    def has_pending_gradients(self) -> bool:
        """True between a backward and the optimizer step that consumes its gradients."""
        return bool(self.grads.has_grad)

    @property
    def optimizer_steps(self) -> dict[str, int]:
        """Parameter name -> AdamW steps taken (absent: never updated). Assignable on resume."""
        return {slot.name: self._steps[slot.index] for _, slot in self.named_slots() if slot.index in self._steps}

    @optimizer_steps.setter
    def optimizer_steps(self, steps: dict[str, int]) -> None:
        self.flush()
        index = {slot.name: slot.index for _, slot in self.named_slots()}
        unknown = set(steps) - set(index)
        if unknown:
            raise ConfigError(f"optimizer steps for unknown parameters: {sorted(unknown)[:5]}")
        self._steps = {index[name]: int(step) for name, step in steps.items()}

    def state_dict(self) -> dict:
        """Full tensors (in the model's dtype), same keys as `model.state_dict()`."""
        self.flush()
        slots = {id(s.param): (s, u.uid) for u in self.units for s in u.slots}
        cache: dict[int, torch.Tensor] = {}
        result = {}
        for key, value in self.module.state_dict(keep_vars=True).items():
            if id(value) in slots:
                if id(value) not in cache:
                    slot, uid = slots[id(value)]
                    cache[id(value)] = self.read_array(self.units[uid], slot).to(self.param_dtype)
                result[key] = cache[id(value)]
            else:
                result[key] = value.detach().clone()
        if self.tiled:
            from tierflow.core.tiling import merge
            result = merge(result, self.tiled)
        return result

    def optimizer_state(self) -> dict:
        """id-free view of AdamW state: parameter name -> {step, exp_avg, exp_avg_sq}."""
        self.flush()
        result = {}
        for unit in self.units:
            for slot in unit.slots:
                if slot.trainable and slot.index in self._steps:
                    result[slot.name] = {"step": self._steps[slot.index],
                                         "exp_avg": self.read_array(unit, slot, "exp_avg"),
                                         "exp_avg_sq": self.read_array(unit, slot, "exp_avg_sq")}
        return result

    # ---- reporting ----------------------------------------------------------------------
    def placement(self) -> dict:
        """Bytes per tier per tensor class, as planned and as now on the device."""
        table = {tier: {} for tier in ("device", "host", "nvme")}
        for state in self.states:
            for name in state.arrays:
                cls = ARRAY_CLASS[name]
                table[state.home][cls] = table[state.home].get(cls, 0) + state.nbytes(name)
        table["device"]["working"] = self.plan.device_working
        buffers = sum(b.numel() * b.element_size() for b in self.module.buffers())
        table["device"]["buffers"] = buffers
        if self.plan.staging_bytes:
            table["host"]["staging"] = self.plan.staging_bytes
        return table

    def io_stats(self) -> dict:
        """Cumulative bytes moved between tiers."""
        stats = dict(self._counters)
        stats["nvme_read"] = self.nvme.bytes_read if self.nvme else 0
        stats["nvme_written"] = self.nvme.bytes_written if self.nvme else 0
        return stats

    def budget_peaks(self) -> dict:
        """tier -> (peak accounted bytes, capacity or None)."""
        return {name: (b.peak, b.capacity) for name, b in self.budgets.items()}

    def _count(self, key: str, nbytes: int) -> None:
        with self._counter_lock:
            self._counters[key] += nbytes

    # ---- shutdown -----------------------------------------------------------------------
    def close(self) -> None:
        """Stop the worker threads and delete the spill file (the state is lost)."""
        if self._closed:
            return
        self._closed = True
        for handle in self._handles:
            handle.remove()
        self._transfer.shutdown(wait=True)
        if self.activations is not None:
            self.activations.close()
        self.grads.close()
        if self.nvme is not None:
            self.nvme.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _model_dtype(model: nn.Module) -> torch.dtype:
    dtypes = {p.dtype for p in model.parameters() if p.dtype.is_floating_point}
    if len(dtypes) > 1:
        raise ConfigError(f"the model mixes parameter dtypes {sorted(map(str, dtypes))}: cast it to one "
                          f"dtype first (e.g. model.float())")
    return dtypes.pop() if dtypes else torch.float32


def _checked(value: torch.Tensor, slot: Slot) -> torch.Tensor:
    """A source tensor for `slot`, verified to have its shape and a floating dtype."""
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"the value given for {slot.name} is not a tensor ({type(value).__name__})")
    if tuple(value.shape) != tuple(slot.shape):
        raise ConfigError(f"the value given for {slot.name} has shape {tuple(value.shape)}, but the model "
                          f"expects {tuple(slot.shape)}")
    if not value.dtype.is_floating_point:
        raise ConfigError(f"the value given for {slot.name} has dtype {value.dtype}; a floating-point "
                          f"dtype is needed")
    return value.detach()


def _default_unit_bytes(cfg: OffloadConfig, model: nn.Module) -> int:
    """About an eighth of the device budget, so several units fit in flight; 256 MiB at most."""
    if cfg.device_memory is None:
        return 256 * 2**20
    return max(1, min(256 * 2**20, cfg.device_memory // 8))


def _scratch_bytes(numel: int) -> int:
    """Device bytes of a GPU-side AdamW's scratch buffers of `numel` fp32 elements each."""
    return SCRATCH_BUFFERS * numel * 4
