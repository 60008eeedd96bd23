"""Activations beyond the device budget: keep, recompute or offload each layer's saved tensors.

Autograd saves tensors in forward for use in backward; with long sequences these
activations, not the weights, fill the device. The engine already routes every
saved tensor through its saved-tensor hooks (`Passes.pack_saved`), so it can
decide, per layer, what happens to the ones that are not views of parameters:

* keep: they stay on the device, accounted against the device budget (by storage,
  so a tensor saved by several ops counts once);
* offload: they are copied to host memory on the transfer thread as forward
  proceeds (to a spill file in the NVMe directory when the host budget is short)
  and copied back ahead of backward, the layers before the one being
  differentiated first;
* recompute: the layer's forward runs under torch's non-reentrant checkpoint
  (RNG state preserved, so dropout draws the same masks); only its inputs are kept
  and its activations are recomputed in backward.

"Layers" are the children of the model's largest `nn.ModuleList` (a transformer's
blocks; see layers.py, which also keeps a recomputed layer's buffers, such as BatchNorm's
running stats, from being updated twice); what is saved outside them (embeddings, the
head, the loss) is kept or offloaded. With "auto" the first step offloads every layer while it measures the
bytes each saves; from then on `policy.choose` keeps as many layers as fit and
offloads or recomputes the rest, whichever the measurements say is cheaper.
"""
from __future__ import annotations

import functools
import threading
import time
import weakref

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tierflow.memory.spill import SpillFile
from tierflow.core.activation_policy import LayerStats, Policy, choose
from tierflow.runtime.layers import buffers_kept, find_layers
from tierflow.runtime.residency import BUDGET_WAIT_S
from tierflow.config import format_size
from tierflow.errors import BudgetError

KEEP_WAIT_S = 2.0             # how long keeping an activation waits for device memory to free
MIN_OFFLOAD_BYTES = 1024      # smaller saved tensors are kept: a copy costs more than it saves
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


class Ledger:
    """Device bytes held for backward, counted once per storage, released when the last
    holder is garbage (autograd frees a saved tensor after its node's backward)."""

    def __init__(self, reserve, budget):
        self._reserve = reserve            # (nbytes, what) -> None; may evict or raise BudgetError
        self._budget = budget
        self._held: dict[int, list] = {}   # storage data_ptr -> [holders, nbytes]
        self._lock = threading.Lock()
        self.bytes = 0
        self.peak = 0

    def hold(self, tensors, owner) -> None:
        """Account `tensors` for as long as `owner` lives."""
        for t in tensors:
            ptr, nbytes = t.untyped_storage().data_ptr(), _nbytes(t)
            if not nbytes:
                continue
            with self._lock:
                entry = self._held.get(ptr)
                if entry is not None:
                    entry[0] += 1
            if entry is None:
                self._reserve(nbytes, "kept activations")
                with self._lock:
                    self._held[ptr] = [1, nbytes]
                    self.bytes += nbytes
                    self.peak = max(self.peak, self.bytes)
            weakref.finalize(owner, self._drop, ptr)

    def _drop(self, ptr: int) -> None:
        with self._lock:
            entry = self._held[ptr]
            entry[0] -= 1
            if entry[0]:
                return
            del self._held[ptr]
            self.bytes -= entry[1]
        self._budget.release(entry[1])


class Kept:
    """What autograd saves for a kept tensor: the tensor, accounted while this lives."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


class Lease:
    """Keeps a recomputed layer's inputs accounted while its checkpoint frame lives."""

    __slots__ = ("__weakref__",)


class Offloaded:
    """A saved tensor copied off the device; `tensor` is set while it is back on the device."""

    __slots__ = ("index", "like", "nbytes", "host", "extent", "copy_out", "fetch", "tensor",
                 "host_bytes", "device_bytes", "__weakref__")

    def __init__(self, index, like, nbytes):
        self.index, self.like, self.nbytes = index, like, nbytes
        self.host = self.extent = self.copy_out = self.fetch = self.tensor = None
        self.host_bytes = self.device_bytes = 0


class ActivationManager:
    """Applies the activation policy to one engine's model (see the module docstring)."""

    def __init__(self, engine, model: nn.Module, hooked: dict, mode: str):
        self.engine = engine
        self.mode = mode
        self.layers = find_layers(model)
        self._layer_uids = {i: sorted(hooked.get(m, ())) for i, m in enumerate(self.layers)}
        self._buffer_ptrs = {b.untyped_storage().data_ptr() for b in model.buffers()}
        budgets = engine.budgets
        self.ledger = Ledger(self._reserve_device, budgets["device"])
        self.spill = SpillFile(engine.cfg.nvme) if engine.cfg.nvme is not None else None
        self.stats = [LayerStats() for _ in self.layers]
        self.outside = LayerStats()
        self.policy = self._first_policy()
        self.steps = 0
        self.recomputing = 0          # >0 while a checkpoint recomputes a layer in backward
        self._stack: list[int] = []   # layer indices whose forward is running (-1: outside)
        self._dedupe: list[dict] = [{}]
        self._records: list = []      # weakrefs to Offloaded, in forward order
        self._live = [0]              # Offloaded records still referenced by autograd
        self._back = [0]              # device bytes of offloaded records fetched back
        self._copy_seconds = 0.0
        self._copy_bytes = 0
        self._handles = []
        self._originals = {}
        self._install()

    # ---- installation --------------------------------------------------------------------
    def _install(self) -> None:
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(functools.partial(self._enter, i)))
            self._handles.append(layer.register_forward_hook(functools.partial(self._exit, i), always_call=True))
            self._originals[i] = layer.__dict__.get("forward")
            layer.forward = functools.partial(self._forward, i, layer.forward)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        for i, layer in enumerate(self.layers):
            if self._originals[i] is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = self._originals[i]
        if self.spill is not None:
            self.spill.close()

    def _first_policy(self) -> Policy:
        n = len(self.layers)
        if self.mode != "auto":
            outside = "offload" if self.mode == "offload" else "keep"
            return Policy((self.mode,) * n, outside)
        # Step 1 measures: offloading every layer needs the least device memory and sees
        # every saved tensor; without a place to offload to, recompute (measures nothing).
        room = self.engine.budgets["host"].room()
        first = "offload" if self.spill is not None or room > 0 else "recompute"
        return Policy((first,) * n, "offload" if first == "offload" else "keep")

    # ---- forward bookkeeping ----------------------------------------------------------------
    def begin_forward(self) -> None:
        """Root pre-hook: after the first (measured) step, auto chooses the policy."""
        measured = self.steps == 1 and "offload" in self.policy.layers  # a recomputing step saw nothing
        if self.mode == "auto" and measured and not self.recomputing:
            self.policy = choose(self.stats, self.outside, self._device_room(), self._offload_room(),
                                 self._copy_rate())
        self.steps += 1
        self._stack = []
        self._dedupe = [{}]

    def end_forward(self) -> None:
        """Root post-hook: sources of offloads saved outside the layers may go now."""
        self._dedupe = [{}]

    def _enter(self, i, module, args):
        if self.recomputing:
            return
        self._stack.append(i)
        self._dedupe.append({})
        self.stats[i].start = time.perf_counter()

    def _exit(self, i, module, args, output):
        if self.recomputing or not self._stack:
            return
        self._stack.pop()
        self._dedupe.pop()
        if self.steps == 1:
            self.stats[i].seconds += time.perf_counter() - self.stats[i].start

    def _current(self) -> tuple[str, LayerStats]:
        if not self._stack:
            return self.policy.outside, self.outside
        i = self._stack[-1]
        return self.policy.layers[i], self.stats[i]

    def _forward(self, i, forward, *args, **kwargs):
        """The layer's forward: as is, or under non-reentrant checkpoint when recomputed."""
        if self.recomputing or not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        inputs = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
        inputs = [t for t in inputs if t.untyped_storage().data_ptr() not in self._buffer_ptrs]
        if self.steps == 1:
            self.stats[i].input_bytes += sum(map(_nbytes, inputs))
        if self.policy.layers[i] != "recompute":
            return forward(*args, **kwargs)
        for key in _CACHE_KWARGS:  # a KV cache would be appended to twice (forward and recompute)
            if key in kwargs:
                kwargs[key] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        lease = Lease()
        with self.engine.bookkeeping():
            self.ledger.hold(inputs, lease)
        return checkpoint(self._replay, i, forward, lease, *args, use_reentrant=False,
                          preserve_rng_state=True, **kwargs)

    def _replay(self, i, forward, lease, *args, **kwargs):
        """Runs the layer; in backward's recomputation, also holds its units as the hooks would."""
        if self._stack and self._stack[-1] == i and not self.recomputing:
            return forward(*args, **kwargs)  # the forward pass itself
        return self._recompute(i, forward, *args, **kwargs)

    def _recompute(self, i, forward, *args, **kwargs):
        uids = self._layer_uids[i]
        self.recomputing += 1
        try:
            if uids:
                self.engine.passes.enter_module(uids)
            try:
                with buffers_kept(self.layers[i]):  # BatchNorm's running stats: updated once, in forward
                    return forward(*args, **kwargs)
            finally:
                if uids:
                    self.engine.passes.exit_module(uids)
        finally:
            self.recomputing -= 1

    # ---- saved tensors -------------------------------------------------------------------------
    def pack(self, tensor: torch.Tensor):
        """Passes.pack_saved for a tensor that is not a view of a parameter."""
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in self._buffer_ptrs or not _nbytes(tensor):
            return tensor
        mode, stats = self._current()
        nbytes = tensor.numel() * tensor.element_size()
        if self.steps == 1 and self._seen(("storage", ptr)) is None:
            self._dedupe[-1][("storage", ptr)] = (weakref.ref(tensor), None)  # once per layer call
            stats.saved_bytes += _nbytes(tensor)
        if mode == "offload" and nbytes >= MIN_OFFLOAD_BYTES and _dense(tensor):
            return self._offload(tensor, nbytes)
        kept = Kept(tensor)
        with self.engine.bookkeeping():
            self.ledger.hold([tensor], kept)
        return kept

    def _seen(self, key):
        """What this layer call already made of the tensor under `key`. Entries hold a weak
        reference to the source, not the source: while it is alive its address is unique,
        and the device memory is not held beyond what autograd holds."""
        entry = self._dedupe[-1].get(key)
        if entry is None or entry[0]() is None:
            return None
        return entry[1] if entry[1] is not None else True

    def unpack(self, saved):
        if isinstance(saved, Kept):
            return saved.tensor
        if isinstance(saved, Offloaded):
            return self._bring_back(saved)
        return saved

    def _offload(self, tensor, nbytes):
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tensor.stride(), tensor.dtype)
        seen = self._seen(key)
        if seen is not None:
            return seen
        self._check_fits_back(nbytes)
        record = Offloaded(len(self._records), _meta(tensor), nbytes)
        self._dedupe[-1][key] = (weakref.ref(tensor), record)
        self._records.append(weakref.ref(record))
        engine = self.engine
        with engine.bookkeeping():  # the copies in flight release their bytes: wait for them
            self._reserve_device(nbytes, "an activation being offloaded", wait=BUDGET_WAIT_S)
        if engine.budgets["host"].try_reserve(nbytes):
            record.host_bytes = nbytes
        elif self.spill is None:  # nowhere to put it: it stays on the device
            engine.budgets["device"].release(nbytes)
            kept = Kept(tensor)
            with engine.bookkeeping():
                self.ledger.hold([tensor], kept)
            self._dedupe[-1][key] = (weakref.ref(tensor), kept)
            return kept
        event = engine.device.record_event()
        record.copy_out = engine.residency.transfer.submit(self._copy_out, record, tensor, event)
        self._live[0] += 1
        weakref.finalize(record, self._freed, engine.budgets, record.host_bytes, self.spill,
                         self._records, self._live)
        return record

    def _copy_out(self, record: Offloaded, tensor, event):
        """Transfer thread: device -> host (or spill file); then the device copy is not ours."""
        engine = self.engine
        start = time.perf_counter()
        try:
            with engine.device.lane("drain"):
                engine.device.wait_event(event)  # the compute stream has produced it
                engine.device.hand_over(tensor)  # read here; not reused before the copy is done
                host = engine.device.host_like(tensor)
                host.copy_(tensor, non_blocking=engine.device.is_cuda)
                engine.device.synchronize_lane()
            if record.host_bytes:
                record.host = host
            else:
                record.extent = self.spill.write(host)
            engine.count("device_to_host", record.nbytes)
        finally:
            engine.budgets["device"].release(record.nbytes)
        self._copy_seconds += time.perf_counter() - start
        self._copy_bytes += record.nbytes

    def _bring_back(self, record: Offloaded) -> torch.Tensor:
        with self.engine.bookkeeping():
            if record.tensor is None and record.fetch is None:
                self._start_fetch(record, required=True)
            self._prefetch_before(record.index)
        if record.fetch is not None:
            with self.engine.health.marks_failure():  # a lost activation: this step cannot finish
                record.fetch.result()
            record.fetch = None
            # Allocated on the copy lane (and complete: its job synchronised), used by compute.
            self.engine.device.hand_over(record.tensor)
        return record.tensor

    def _start_fetch(self, record: Offloaded, required: bool) -> bool:
        engine = self.engine
        if not required and self._back[0] + record.nbytes > self._prefetch_room():
            return False  # read-ahead must not take the room the next weights and gradients need
        if not engine.residency.reserve_device(record.nbytes, "an offloaded activation", required):
            return False
        record.device_bytes = record.nbytes
        self._back[0] += record.nbytes
        weakref.finalize(record, self._returned, engine.budgets["device"], record.nbytes, self._back)
        record.fetch = engine.residency.transfer.submit(self._copy_in, record)
        return True

    def _copy_in(self, record: Offloaded) -> None:
        """Transfer thread: host (or spill file) -> device, ahead of the backward that needs it."""
        engine = self.engine
        record.copy_out.result()
        if record.extent is not None:
            host = engine.device.host_like(record.like)
            self.spill.read(record.extent, host)
        else:
            host = record.host
        if not engine.device.is_cuda:
            out = host  # a CPU computes on host memory directly: no second copy needed
        else:
            with engine.device.lane("copy"):
                out = torch.empty_like(record.like, device=engine.device.device)  # same strides
                out.copy_(host, non_blocking=True)
                engine.device.synchronize_lane()
        record.tensor = out
        engine.count("host_to_device", record.nbytes)

    def _prefetch_before(self, index: int) -> None:
        """Start copying back the activations saved just before `index` (backward runs in reverse)."""
        window = self.engine.plan.prefetch_bytes or 0
        window = max(window, max((s.saved_bytes for s in self.stats), default=0))
        used = 0
        for j in range(index - 1, -1, -1):
            record = self._records[j]()
            if record is None:
                continue
            used += record.nbytes
            if used > window:
                return
            if record.tensor is None and record.fetch is None:
                if not self._start_fetch(record, required=False):
                    return

    def _check_fits_back(self, nbytes: int) -> None:
        """Fail in forward when backward could not bring this tensor back (it returns whole,
        into the room the plan left for activations): waiting would only stall the step. Its
        size depends on the batch, which `offload()` does not know: this is the earliest check."""
        room = self._device_room()
        if nbytes > room:
            where = f"layer {self._stack[-1]}" if self._stack else "outside the layers"
            raise BudgetError(
                f"activations={self.mode!r}: a tensor of {format_size(nbytes)} saved for backward ({where}) "
                f"does not fit the {format_size(max(0, room))} that device_memory="
                f"{format_size(self.engine.budgets['device'].capacity)} leaves for activations after the "
                f"working set and device-resident state ({format_size(nbytes - room)} short); raise "
                f"device_memory by more than that (about half of the increase goes to activations), or "
                f"use a smaller batch or sequence length")

    @staticmethod
    def _returned(budget, nbytes, back) -> None:
        # A finalizer (no reference to the manager): a fetched-back activation is garbage.
        back[0] -= nbytes
        budget.release(nbytes)

    def _prefetch_room(self) -> float:
        """Device bytes that fetched-back activations may take ahead of need: the room the plan
        left for activations, less what is kept. Only autograd's progress frees such bytes, so
        read-ahead beyond it would leave the weights (and gradients) backward needs next
        waiting for memory that cannot free: the step would stall, then fail."""
        return self._device_room() - self.ledger.bytes

    @staticmethod
    def _freed(budgets, host_bytes, spill, records, live) -> None:
        # A finalizer: it must not keep the manager alive, hence the explicit arguments.
        if host_bytes:
            budgets["host"].release(host_bytes)
        live[0] -= 1
        if not live[0]:
            records.clear()  # every offloaded tensor of the step is gone: start afresh
            if spill is not None:
                spill.reset()

    # ---- budgets and reporting --------------------------------------------------------------
    def _reserve_device(self, nbytes: int, what: str, wait: float = KEEP_WAIT_S) -> None:
        """Reserve device bytes for activations: evict cached units, then wait a little for
        copies and gradient drains to free memory (not the engine's long wait: kept
        activations that do not fit should fail fast)."""
        try:
            if not self.engine.residency.reserve_device(nbytes, what, required=False):
                self.engine.budgets["device"].reserve(nbytes, what, wait=wait)
        except BudgetError as exc:
            hint = "" if self.mode == "auto" else "; activations='auto' (or 'recompute' / 'offload') may fit"
            raise BudgetError(f"{exc}{hint}") from None

    def _device_room(self) -> float:
        """Device bytes that activations may use: the budget less what the plan set aside."""
        engine = self.engine
        cap = engine.budgets["device"].capacity
        if cap is None:
            return float("inf")
        fixed = engine.plan.device_working + engine.plan.tier_bytes["device"]
        fixed += sum(b.numel() * b.element_size() for b in engine.module.buffers())
        return cap - fixed

    def _offload_room(self) -> float:
        return float("inf") if self.spill is not None else self.engine.budgets["host"].room()

    def _copy_rate(self) -> float:
        return self._copy_bytes / self._copy_seconds if self._copy_seconds > 0 else 5e9

    def describe(self) -> str:
        """One line: the mode and how many layers are kept, offloaded, recomputed."""
        counts = {m: self.policy.layers.count(m) for m in ("keep", "offload", "recompute")}
        layers = ", ".join(f"{n} {m}" for m, n in counts.items() if n)
        return (f"{self.mode}: {len(self.layers)} layers ({layers}); outside the layers: "
                f"{self.policy.outside}; kept peak {self.ledger.peak / 2**20:.1f} MiB")

    def report(self) -> dict:
        """The mode of every layer and what the measured step saved (bytes per layer)."""
        return {"mode": self.mode, "layers": list(self.policy.layers), "outside": self.policy.outside,
                "saved_bytes": [s.saved_bytes for s in self.stats], "outside_bytes": self.outside.saved_bytes,
                "kept_peak": self.ledger.peak}


def _dense(t: torch.Tensor) -> bool:
    """Copyable with its strides kept (empty_like preserves them for such tensors)."""
    order = sorted(range(t.dim()), key=t.stride, reverse=True)
    return t.permute(order).is_contiguous()


def _meta(t: torch.Tensor) -> torch.Tensor:
    """Shape, dtype and strides without data (the source is no longer needed)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
