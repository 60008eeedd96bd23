"""The engine: a model whose training state is tiered across device, host and NVMe.

It only coordinates; each part has its own module:

    build.py         one planning pass (units, homes, tiling), then the state in its tiers
    residency.py     acquire / release / fetch / update / evict units within the device budget
    passes.py        what forward and backward do (hooks.py calls it): trace, prefetch, tokens
    gradients.py     gradients out of the device as autograd produces them; clipping
    steps.py         opt.step() records updates; non-finite steps; flush
    state_access.py  full tensors out of the tiers and back (checkpoints, state_dict)
    activations.py   what autograd saves (keep / recompute / offload), with `activations=`
    holding.py       the parameters an engine detached: a model is never adopted twice

A training step, in the order things happen, is drawn in docs/architecture.md.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn

from tierflow.config import OffloadConfig
from tierflow.core.layout import default_unit_bytes, model_dtype
from tierflow.dist import ranks
from tierflow.memory.device import ComputeDevice
from tierflow.memory.tiers import StateIO
from tierflow.runtime import build, expert_hooks, holding, hooks
from tierflow.runtime.events import EventLog, IoCounters
from tierflow.runtime.gradients import GradientSink
from tierflow.runtime.health import Health
from tierflow.runtime.passes import Passes
from tierflow.runtime.residency import Residency
from tierflow.runtime.state_access import StateAccess
from tierflow.runtime.steps import OptimizerSteps


class Engine:
    """A model whose training state is tiered across device, host and NVMe.

    Create it with `tierflow.offload`. Call it like the model.
    """

    def __init__(self, model: nn.Module, cfg: OffloadConfig, placement: str = "auto", source=None):
        """`source`: optional callable (parameter name) -> tensor giving each parameter's initial
        value (e.g. read from a checkpoint or safetensors shard, one tensor at a time); the
        model's parameters may then be on the meta device."""
        holding.check_not_held(model)  # its data would be NaN placeholders: said before any work
        self.module, self.cfg = model, cfg
        self.device = ComputeDevice(cfg.device)
        self.param_dtype = model_dtype(model)
        self.compute_dtype = cfg.dtype or self.param_dtype
        self.events = EventLog()  # engine.events.enable() records spans and memory for timelines
        self.counters = IoCounters()
        self.count = self.counters.count  # count('host_to_device' | 'device_to_host', nbytes); any thread
        self.budgets = build.make_budgets(cfg, self.events)
        self.health = Health()
        if source is not None:
            build.replace_meta_parameters(model, self.device.placeholder(self.compute_dtype))
        self.dist = ranks.detect()  # data-parallel ranks sharing the state, or None
        buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
        model_plan = build.plan_model(model, cfg, self.compute_dtype, buffer_bytes,
                                      cfg.unit_bytes or default_unit_bytes(cfg), self.dist.world if self.dist else 1,
                                      placement, from_source=source is not None)
        self.units, self.plan, self.tiled = model_plan.units, model_plan.placement, model_plan.tiled
        self.param_owner = {id(s.param): u.uid for u in self.units for s in u.slots}
        # What _setup has done so far, for _undo_setup (a failure must leave the model as it was).
        self.nvme = self.residency = self.grads = self.activations = None
        self._handles, self._moved_buffers, self.adoption = [], [], holding.Adoption()
        try:
            expert_hooks.check_supported(model, self.units, self.param_owner, self.dist)
            self.nvme = build.open_nvme(cfg, self.plan)
            self._setup(model, source, buffer_bytes, model_plan.hooked)
        except BaseException:
            self._undo_setup()
            model_plan.restore()
            raise
        self.adoption.settle()

    def _setup(self, model, source, buffer_bytes, hooked) -> None:
        """Everything after the plan: pools, state in its tiers, threads, hooks."""
        pools = build.make_pools(self.cfg, self.plan, self.budgets, self.nvme, pin=self.device.is_cuda)
        self.io = StateIO(self.device, self.budgets, self.nvme, pools[0])
        self._moved_buffers = build.move_buffers(model, self.budgets, self.device.device, buffer_bytes)
        self.states = build.load_state(self.units, self.plan.homes, self.io, self.compute_dtype, self.dist, source)
        self._lock, self._busy = threading.RLock(), 0
        self.residency = Residency(self.units, self.states, self.plan, self.device, self.io, self.budgets,
                                   self.compute_dtype, self.events, self.dist, self.count, self.health)
        self.adoption.take(self.units, self.residency)  # (streamed ones: NaN placeholders, holding.py)
        self.grads = GradientSink(StateIO(self.device, self.budgets, self.nvme, pools[1]), self.budgets["device"],
                                  self.device, self.count, self.events, self.dist, self.units)
        self.steps = OptimizerSteps(self.units, self.residency, self.grads, self.health, self.bookkeeping)
        self.state = StateAccess(self)
        self.passes = Passes(self)
        # With every unit's weights permanently on the device nothing is ever fetched: the
        # per-op on-demand check (a Python call per torch op, costly on a GPU) is skipped and
        # updates are applied when a forward begins instead.
        self.fetches_on_demand = not all(self.residency.is_permanent(uid) for uid in range(len(self.units)))
        self._handles += hooks.install(self, self.passes, model, hooked)
        self.experts, handles = expert_hooks.install(self, model)  # routed MoE experts (experts.py), or None
        self._handles += handles
        if self.cfg.activations is not None:  # an ActivationManager when cfg.activations asks for one
            from tierflow.runtime.activations import ActivationManager
            self.activations = ActivationManager(self, model, hooked, self.cfg.activations)

    def _undo_setup(self) -> None:
        """A failed setup leaves the model as it was: no hooks, no threads, no spill file, its
        own tensors back (values and strides) and its buffers where they were."""
        self._stop()
        self.adoption.give_back()
        build.restore_buffers(self._moved_buffers)

    def _stop(self) -> None:
        """Remove the hooks, stop the worker threads, delete the spill file (NvmeStore.close)."""
        for handle in self._handles:
            handle.remove()
        for part in (self.residency, self.activations, self.grads, self.nvme):
            if part is not None:
                part.close()

    # ---- the engine's lock --------------------------------------------------------------
    @contextlib.contextmanager
    def bookkeeping(self):
        """Serialise engine bookkeeping, with the on-demand fetch hook off inside it."""
        with self._lock:
            self._busy += 1
            try:
                yield
            finally:
                self._busy -= 1

    @property
    def busy(self) -> bool:
        """True while engine code runs (ops it calls must not fetch on demand)."""
        return self._busy > 0

    # ---- calling the model --------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        self.health.check()
        to_device = lambda x: x.to(self.device.device, non_blocking=True) if isinstance(x, torch.Tensor) else x
        args = tuple(to_device(a) for a in args)
        kwargs = {k: to_device(v) for k, v in kwargs.items()}
        return self.module(*args, **kwargs)

    def __getattr__(self, name):
        # Everything else (generate, config, train/eval, ...) is the model's.
        if name == "module":
            raise AttributeError(name)
        return getattr(self.module, name)

    @property
    def trace(self):
        return self.passes.trace

    # ---- gradients and the optimizer ----------------------------------------------------
    def wait_for_gradients(self) -> None:
        """Block until every gradient has reached its tier (errors surface here)."""
        with self.health.marks_failure():
            self.grads.wait()

    def zero_grad(self) -> None:
        with self.health.marks_failure():
            self.grads.zero()

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False) -> torch.Tensor:
        """Global gradient norm over all tiers, computed as torch.nn.utils.clip_grad_norm_ does."""
        self.health.check()
        with self.health.marks_failure():
            return self.grads.clip(max_norm, norm_type, error_if_nonfinite)

    def attach_optimizer(self, optimizer) -> None:
        self.steps.attach(optimizer, set(self.param_owner))

    def queue_step(self, hyper_params: dict) -> None:
        """Record an AdamW update for every parameter with a gradient; applied lazily."""
        self.steps.record(hyper_params)
        self.device.reuse_step_memory()
        with self.bookkeeping():  # the first units' updates start now, beside what comes next
            self.residency.prefetch(self.passes.trace.order)

    def flush(self) -> None:
        """Apply every recorded update now (before reading or saving the state)."""
        self.steps.flush()

    @property
    def optimizer(self):
        """The tierflow.AdamW attached to this engine, or None."""
        return self.steps.optimizer

    @property
    def has_pending_gradients(self) -> bool:
        """True between a backward and the optimizer step that consumes its gradients."""
        return bool(self.grads.has_grad)

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped because their gradients were not finite."""
        return self.steps.skipped

    @property
    def optimizer_steps(self) -> dict[str, int]:
        """Parameter name -> AdamW steps taken (absent: never updated). Assignable on resume."""
        return self.steps.by_name(self.named_slots())

    @optimizer_steps.setter
    def optimizer_steps(self, steps: dict[str, int]) -> None:
        self.steps.set_by_name(steps, list(self.named_slots()))

    # ---- reading and writing state (state_access.py) ----------------------------------------
    def named_slots(self):
        """(unit, slot) for every parameter, in unit order; slot.name is the parameter name."""
        return self.state.named_slots()

    def read_array(self, unit, slot, name: str = "master") -> torch.Tensor:
        """One parameter's array as a new fp32 CPU tensor (see StateAccess.read_array)."""
        return self.state.read_array(unit, slot, name)

    def write_array(self, unit, slot, name: str, value: torch.Tensor) -> None:
        """Overwrite one parameter's array in its home tier (see StateAccess.write_array)."""
        self.state.write_array(unit, slot, name, value)

    def iter_windows(self, unit, slot, names=("master",)):
        """One parameter's arrays window by window (see StateAccess.iter_windows)."""
        return self.state.iter_windows(unit, slot, names)

    def state_dict(self) -> dict:
        """Full tensors (in the model's dtype), same keys as `model.state_dict()`."""
        return self.state.state_dict()

    def optimizer_state(self) -> dict:
        """id-free view of AdamW state: parameter name -> {step, exp_avg, exp_avg_sq}."""
        return self.state.optimizer_state()

    # ---- reporting ----------------------------------------------------------------------
    def placement(self) -> dict:
        """Bytes per tier per tensor class, as planned and as now on the device."""
        return self.state.placement()

    def io_stats(self) -> dict:
        """Cumulative bytes moved between tiers."""
        stats = dict(self.counters.totals)
        stats["nvme_read"] = self.nvme.bytes_read if self.nvme else 0
        stats["nvme_written"] = self.nvme.bytes_written if self.nvme else 0
        return stats

    def budget_peaks(self) -> dict:
        """tier -> (peak accounted bytes, capacity or None)."""
        return {name: (b.peak, b.capacity) for name, b in self.budgets.items()}

    # ---- shutdown -----------------------------------------------------------------------
    def close(self) -> None:
        """Stop the worker threads and delete the spill file (the state is lost)."""
        if self.health.closed:
            return
        self.health.closed = True
        self._stop()
        self.adoption.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
