"""Mixture-of-experts layers whose experts are fetched one by one, as the router picks them.

transformers 5 keeps a layer's experts fused: `gate_up_proj` [E, 2I, H] and `down_proj`
[E, H, I] in one experts module, called as `experts(hidden, top_k_index, top_k_weights)` after
the router. When these weights are frozen (`layout.is_routed`), the experts module is a unit of
its own that is never fetched whole; instead its forward is wrapped (expert_hooks.py):

* the pre-hook reads `top_k_index`, the experts the router picked for the current tokens, and
  gets each of them from the `ExpertStore`: a hit is on the device already, a miss is read
  from the unit's home right away (only that expert's rows of each fused parameter). Tokens of
  a batch that pick the same expert share one fetch.
* The picked experts are stacked into compact parameters [k, ...] and `top_k_index` is mapped
  onto them (expert e -> its position among the k, ascending). transformers' own forward then
  runs unchanged on the compact module (whatever `experts_implementation` it uses), visiting
  the same experts in the same order with the same weights: the output is bitwise the same as
  with all experts resident. The post-hook puts the parameters back.
* On a CPU the stack is one reused aligned buffer: misses are read by O_DIRECT straight into
  their places in it (no fresh memory, no copy).
* Cache: each layer keeps up to `slots` experts on the device (least recently used goes
  first); the slots come from what the device budget leaves after the streamed units. On a
  CPU each cached expert lives in a flat buffer that an evicted expert hands on with its
  budget reservation (fresh memory costs a page fault per 4 KiB).
* Prefetch: the current hidden state, run through the next layer's router (a device copy of
  its weight, taken the first time it ran), predicts the next layer's experts; those not
  cached are fetched ahead on the transfer thread into free or idle slots (as in
  mixtral-offloading and Pre-gated MoE). A wrong guess costs bytes, not correctness.

Experts that are device-homed (or, on a CPU, host-homed) are attached for good like any unit
and need none of this. Trainable experts stream as whole units (the gradient of a fused
parameter covers every expert).
"""
from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import nn

from tierflow.errors import ConfigError, TierflowError
from tierflow.memory.pool import aligned_empty

CACHE_SHARE = 0.75  # of the device room left after the streamed units' needs and the stack
# buffer, for cached experts (the rest: router copies, stacks that do not fit the buffer)
SPARE_EXPERTS = 4  # CPU: the least the reused stack buffer holds (a decode step's top-k for a
# few tokens); a whole layer's experts (a prefill's) when the budget has room for them


@dataclass
class Entry:
    """One expert of one layer on the device (or on its way there)."""

    expert: int
    tensors: dict | None = None        # parameter name -> this expert's rows (device)
    fetch: Future | None = None        # in-flight fetch, shared by the experts read together
                                       # (result: ({expert: tensors}, event))
    refs: int = 0                      # held by a forward that is using it
    last_use: int = 0
    speculative: bool = False          # fetched ahead on a prediction, not used since
    borrowed: bool = False             # its rows were read straight into the stack buffer (CPU):
                                       # valid until the layer's call ends (`release_stack`)
    buffer: torch.Tensor | None = None # CPU: the flat buffer that holds its rows, reused when
                                       # the expert is evicted


@dataclass
class RoutedLayer:
    """A routed experts module: which unit holds its fused parameters and where each expert's
    rows are in the unit's flat arrays."""

    index: int
    name: str
    module: nn.Module
    uid: int
    params: dict                      # name -> (Slot, elements per expert)
    router: nn.Module | None          # the sibling module whose `weight` [E, H] routes tokens
    expert_bytes: int
    entries: OrderedDict = field(default_factory=OrderedDict)  # expert -> Entry, least recent first
    router_weight: torch.Tensor | None = None                  # device copy, for predictions


class ExpertStore:
    """Fetch, cache and prefetch single experts of routed layers within the device budget."""

    def __init__(self, engine, layers: list[RoutedLayer], slots: int, stack_experts: int = 0):
        self.engine, self.layers, self.slots = engine, layers, slots
        self.stack_bytes = stack_experts * max(layer.expert_bytes for layer in layers)
        self.residency, self.device = engine.residency, engine.device
        self.budget = engine.budgets["device"]
        self._tick = itertools.count(1)
        self._lock = threading.Lock()  # bytes_read is counted on the transfer thread
        self.spare: torch.Tensor | None = None  # CPU: the reused buffer of compact parameters
        self.free: list[torch.Tensor] = []  # CPU: idle expert buffers, reserved in the budget
        # (pages mapped: evicted experts' buffers, and those made while loading)
        self.counters = dict.fromkeys(("requests", "hits", "misses", "prefetched", "prefetch_hits",
                                       "bytes_read", "bytes_routed"), 0)

    # ---- the forward of a routed layer ---------------------------------------------------------
    def take(self, layer: RoutedLayer, experts: list[int]) -> dict:
        """Compact parameters [len(experts), ...] of the picked experts (ascending), each fetched
        at most once; misses are read at once, all of them in flight together."""
        self.counters["requests"] += len(experts)
        self.counters["bytes_routed"] += len(experts) * layer.expert_bytes
        for e in experts:  # hold the hits first: a miss's reservation may give up idle experts
            entry = layer.entries.get(e)
            if entry is not None:
                self.counters["hits"] += 1
                self.counters["prefetch_hits"] += entry.speculative
                entry.refs += 1
        misses = [e for e in experts if e not in layer.entries]
        self.counters["misses"] += len(misses)
        places = self._places(layer, experts)
        into = None if places is None else {e: {name: rows[experts.index(e)] for name, rows in places.items()}
                                            for e in misses}
        for entry in self._start(layer, misses, required=True, into=into):
            entry.refs += 1
        for e in experts:
            entry = layer.entries[e]
            entry.speculative, entry.last_use = False, next(self._tick)
            layer.entries.move_to_end(e)
        try:
            for e in experts:
                self._finish(layer.entries[e])
            stacked = self._stack(layer, experts, places)
        finally:
            for e in experts:
                layer.entries[e].refs -= 1
            self._trim(layer)
        return stacked

    def _places(self, layer: RoutedLayer, experts: list[int]) -> dict | None:
        """CPU: where each picked expert's rows go in the reused stack buffer, name -> [k, ...]
        (misses are read straight there: no fresh memory, no copy); None when it does not fit
        (then the rows are stacked into new memory)."""
        spare = self._spare_for(len(experts) * layer.expert_bytes)
        return None if spare is None else self._layout(layer, spare, len(experts))

    def _stack(self, layer: RoutedLayer, experts: list[int], places: dict | None) -> dict:
        """The compact parameters: the stack buffer's places, with the rows not read straight
        there copied in (fresh memory costs a page fault per 4 KiB, more than the copy itself);
        without places, new memory within the device budget."""
        if places is not None:
            for name, target in places.items():
                for j, e in enumerate(experts):
                    row = layer.entries[e].tensors[name]
                    if row.data_ptr() != target[j].data_ptr():
                        target[j].copy_(row)
            return places
        self.residency.reserve_device(len(experts) * layer.expert_bytes,
                                      f"the {len(experts)} experts of '{layer.name}' in use", required=True)
        out = {}
        for name, param in layer.module.named_parameters(recurse=False):
            rows = [layer.entries[e].tensors[name] for e in experts]
            shape = (len(rows),) + tuple(param.shape[1:])
            out[name] = torch.stack(rows) if rows else param.new_empty(shape, device=self.device.device)
        return out

    def _spare_for(self, nbytes: int) -> torch.Tensor | None:
        """The CPU stack buffer (kept reserved in the device budget) if `nbytes` fit in it; it
        is made on first use, `stack_bytes` big (`room_plan`)."""
        if self.device.is_cuda or not self.stack_bytes:
            return None
        if self.spare is None:
            if not self.budget.try_reserve(self.stack_bytes):
                return None
            # aligned: O_DIRECT reads of experts land in it
            self.spare = aligned_empty(self.stack_bytes).view(self.engine.compute_dtype)
        return self.spare if nbytes <= self.stack_bytes else None

    def release_stack(self, layer: RoutedLayer, count: int) -> None:
        """The layer's call is over: the stack buffer is free for the next one, so the experts
        the cache keeps that were read into it get memory of their own."""
        if self._spare_for(count * layer.expert_bytes) is None:
            self.budget.release(count * layer.expert_bytes)
        for entry in layer.entries.values():
            if entry.borrowed:
                if entry.buffer is None:
                    entry.buffer = self._buffer(layer)
                rows = self._rows_in(layer, entry.buffer)
                for name, target in rows.items():
                    target.copy_(entry.tensors[name])
                entry.tensors, entry.borrowed = rows, False

    def _take_free(self, layer: RoutedLayer) -> torch.Tensor | None:
        """An idle buffer of exactly one expert of `layer`, its reservation handed on with it."""
        for i, buffer in enumerate(self.free):
            if buffer.numel() * buffer.element_size() == layer.expert_bytes:
                return self.free.pop(i)
        return None

    def _buffer(self, layer: RoutedLayer) -> torch.Tensor:
        """A flat CPU buffer for one expert's rows (its entry holds the budget reservation): an
        idle one (pages mapped already; fresh memory costs a page fault per 4 KiB, ~1 GB/s
        here) or a new aligned one."""
        for i, buffer in enumerate(self.free):
            if buffer.numel() * buffer.element_size() >= layer.expert_bytes:
                self.budget.release(buffer.numel() * buffer.element_size())
                return self.free.pop(i)
        return aligned_empty(layer.expert_bytes).view(self.engine.compute_dtype)

    def _keep_free(self, buffer: torch.Tensor) -> None:
        """Keep an idle buffer (reserved) while the cache could use it, else let it go."""
        nbytes = buffer.numel() * buffer.element_size()
        if len(self.free) < self.slots * len(self.layers) and self.budget.try_reserve(nbytes):
            self.free.append(buffer)

    def make_buffers(self) -> None:
        """CPU, while loading: the buffers of the cache's slots, touched now so that their page
        faults are not paid in the first forward (as many as the budget has room for)."""
        if self.device.is_cuda:
            return
        largest = max(self.layers, key=lambda layer: layer.expert_bytes)
        while len(self.free) < self.slots * len(self.layers) \
                and self.budget.room() >= largest.expert_bytes + self.stack_bytes:
            self._keep_free(aligned_empty(largest.expert_bytes).view(self.engine.compute_dtype).zero_())

    def drop_idle(self, nbytes: int) -> bool:
        """Give up idle buffers until the budget has `nbytes` of room (or none is left): tried
        before residency evicts any unit (they hold no data)."""
        freed = False
        while self.free and self.budget.room() < nbytes:
            buffer = self.free.pop()
            self.budget.release(buffer.numel() * buffer.element_size())
            freed = True
        return freed

    @staticmethod
    def _layout(layer: RoutedLayer, buffer: torch.Tensor, count: int) -> dict:
        """`count` experts' rows of each fused parameter, one parameter after the other, as
        views of `buffer` (name -> [count, ...])."""
        out, offset = {}, 0
        for name, param in layer.module.named_parameters(recurse=False):
            numel = count * layer.params[name][1]
            out[name] = buffer[offset:offset + numel].view((count,) + tuple(param.shape[1:]))
            offset += numel
        return out

    def _rows_in(self, layer: RoutedLayer, buffer: torch.Tensor) -> dict:
        """One expert's rows of each fused parameter, as views of `buffer` (name -> rows)."""
        return {name: rows[0] for name, rows in self._layout(layer, buffer, 1).items()}

    # ---- fetching ----------------------------------------------------------------------------
    def _start(self, layer: RoutedLayer, experts: list[int], required: bool, keep=(), into=None) -> list[Entry]:
        """Reserve the experts' room and queue one fetch of them all on the transfer thread (a
        speculative fetch takes only free room or idle slots of experts not in `keep`, and may
        start fewer). `into`: expert -> {name: rows} to read into (the stack buffer)."""
        chosen = []
        for e in experts:  # (all reservations first: one may give up idle experts)
            buffer = self._take_free(layer)  # CPU: an idle buffer, whose reservation is this expert's
            if buffer is None:
                if required:
                    self.residency.reserve_device(layer.expert_bytes, f"expert {e} of '{layer.name}'", required=True)
                else:
                    room, buffer = self._room_for(layer, keep)
                    if not room:
                        break
            chosen.append((e, buffer))
        for e, buffer in chosen:
            layer.entries[e] = Entry(e, borrowed=into is not None, buffer=buffer)
        if not chosen:
            return []
        if into is None and not self.device.is_cuda:  # (a prefetch: into buffers of its own)
            into = {}
            for e, _ in chosen:
                entry = layer.entries[e]
                if entry.buffer is None:
                    entry.buffer = self._buffer(layer)
                into[e] = self._rows_in(layer, entry.buffer)
        experts = [e for e, _ in chosen]
        future = self.residency.transfer.submit(self._fetch_job, layer, experts, into)
        for e in experts:
            layer.entries[e].fetch = future
        return [layer.entries[e] for e in experts]

    def _room_for(self, layer: RoutedLayer, keep) -> tuple[bool, torch.Tensor | None]:
        """Room for one speculative fetch: a free slot of the layer within the free budget, or
        the slot of the layer's least recently used idle expert (not one in `keep`), whose
        buffer it then reuses. Returns (room reserved, that buffer or None)."""
        if len(layer.entries) < self.slots and self.budget.try_reserve(layer.expert_bytes):
            return True, None
        idle = [e for e, entry in layer.entries.items() if self._idle(entry) and e not in keep]
        if not idle:
            return False, None
        buffer = self._evict(layer, idle[0], keep_buffer=False)
        return self.budget.try_reserve(layer.expert_bytes), buffer

    def _fetch_job(self, layer: RoutedLayer, experts: list[int], into: dict | None):
        """Transfer thread: each fused parameter's rows of the experts, from the unit's home,
        in one pipeline of reads (into `into`'s rows when given). Returns
        ({expert: {name: rows}}, event)."""
        state = self.engine.states[layer.uid]
        wanted = [(e, name, slot, per_expert) for e in experts for name, (slot, per_expert) in layer.params.items()]
        targets = None if into is None else [into[e][name].view(-1) for e, name, _, _ in wanted]
        with self.device.lane("copy"):
            rows, read = self.engine.io.read_ranges(state, "master", [(slot.offset + e * per_expert, per_expert)
                                                                      for e, _, slot, per_expert in wanted], targets)
            event = self.device.record_event()
        out = {e: {} for e in experts}
        for (e, name, slot, _), tensor in zip(wanted, rows):
            out[e][name] = tensor.view(slot.shape[1:])
        self.engine.count("host_to_device", len(experts) * layer.expert_bytes)
        with self._lock:
            self.counters["bytes_read"] += read
        return out, event

    def _finish(self, entry: Entry) -> None:
        if entry.fetch is None:
            return
        future, entry.fetch = entry.fetch, None
        try:
            tensors, event = future.result()
        except BaseException as exc:
            self.engine.health.fail(exc)
            raise
        self.device.wait_event(event)
        entry.tensors = tensors[entry.expert]
        for tensor in entry.tensors.values():
            self.device.hand_over(tensor)  # allocated on the copy lane, read by compute kernels

    # ---- the cache -------------------------------------------------------------------------------
    @staticmethod
    def _idle(entry: Entry) -> bool:
        """Not in use and not being read (a finished speculative read that was never used is idle)."""
        return entry.refs == 0 and (entry.fetch is None or entry.fetch.done())

    def _trim(self, layer: RoutedLayer) -> None:
        """Down to the layer's slots, least recently used first (after a call that needed more)."""
        for e in [e for e, entry in layer.entries.items() if self._idle(entry)]:
            if len(layer.entries) <= self.slots:
                return
            self._evict(layer, e)

    def _evict(self, layer: RoutedLayer, e: int, keep_buffer: bool = True) -> torch.Tensor | None:
        """Drop expert `e` from the cache and its reservation; its buffer (CPU) stays among the
        idle ones if `keep_buffer`, else it is returned."""
        entry = layer.entries.pop(e)
        self.budget.release(layer.expert_bytes)
        if entry.buffer is None or entry.borrowed:  # (a borrowed entry's rows are in the stack buffer)
            return None
        if not keep_buffer:
            return entry.buffer
        self._keep_free(entry.buffer)
        return None

    def set_slots(self, slots: int) -> None:
        """Keep at most `slots` experts per layer cached from now on (0: none)."""
        if not isinstance(slots, int) or slots < 0:
            raise ConfigError(f"expert cache slots must be an integer >= 0, got {slots!r}")
        self.slots = slots
        for layer in self.layers:
            self._trim(layer)
        while len(self.free) > slots * len(self.layers):
            buffer = self.free.pop()
            self.budget.release(buffer.numel() * buffer.element_size())

    def forget(self, uid: int) -> None:
        """Drop every cached expert of unit `uid` (its weights were overwritten)."""
        for layer in self.layers:
            if layer.uid == uid:
                for e, entry in list(layer.entries.items()):
                    if entry.refs:
                        raise TierflowError(f"cannot overwrite expert {e} of '{layer.name}' while a forward uses it")
                    self._finish(entry)  # an in-flight read must not land after the drop
                    self._evict(layer, e)

    def reclaim(self, nbytes: int) -> bool:
        """Residency needs device memory: give up idle experts, least recently used first."""
        freed = self.drop_idle(nbytes)
        idle = sorted(((entry.last_use, layer, e) for layer in self.layers
                       for e, entry in layer.entries.items() if self._idle(entry)), key=lambda t: t[0])
        for _, layer, e in idle:
            if self.budget.room() >= nbytes:
                break
            self._evict(layer, e, keep_buffer=False)
            freed = True
        return freed

    # ---- prediction --------------------------------------------------------------------------------
    def remember_router(self, layer: RoutedLayer) -> None:
        """A device copy of the layer's router weight (its unit has just run), for predictions."""
        weight = getattr(layer.router, "weight", None)
        if layer.router_weight is not None or weight is None:
            return
        if weight.device != self.device.device or 0 in weight.stride():  # not resident: a placeholder
            return
        if self.budget.try_reserve(weight.numel() * weight.element_size()):
            layer.router_weight = weight.detach().clone()

    def prefetch_next(self, layer: RoutedLayer, hidden: torch.Tensor, top_k: int) -> None:
        """Fetch ahead the experts the next routed layer's router would pick for `hidden`."""
        if layer.index + 1 >= len(self.layers) or not self.slots:
            return
        nxt = self.layers[layer.index + 1]
        if nxt.router_weight is None:
            return
        with torch.no_grad():
            logits = nn.functional.linear(hidden.to(nxt.router_weight.dtype), nxt.router_weight)
            k = min(getattr(nxt.router, "top_k", top_k), logits.shape[-1], self.slots)
            guess = torch.unique(torch.topk(logits, k, dim=-1).indices).tolist()
        guess = guess[:self.slots]
        for entry in self._start(nxt, [e for e in guess if e not in nxt.entries], required=False, keep=set(guess)):
            entry.speculative = True
            self.counters["prefetched"] += 1

    # ---- reports -----------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Counters since the engine was built: requests (expert uses), hits, misses, prefetched
        and prefetch_hits, bytes_read (from the homes) and bytes_routed (of the experts used),
        hit_rate and the cache's slots per layer."""
        out = dict(self.counters, slots=self.slots, layers=len(self.layers))
        out["hit_rate"] = out["hits"] / out["requests"] if out["requests"] else 0.0
        return out
