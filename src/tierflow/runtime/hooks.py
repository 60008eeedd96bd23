"""Torch-native hooks that connect a model to the engine; they only acquire and release.

* Module forward hooks: a hooked module acquires the units it needs before it
  runs and releases them after (the engine prefetches what comes next).
* Saved-tensor hooks: when autograd saves a view of a unit's device buffer for
  backward, it saves a small token instead, so the buffer can be released after
  forward; unpacking the token in backward acquires the unit again.
* A torch-function mode, as a safety net: a parameter used outside its own
  module's forward (e.g. `F.linear(h, self.embed.weight)` in a parent module) is
  fetched on demand and released with the module that used it.
* Gradient hooks: every trainable parameter hands its gradient to the engine the
  moment autograd has accumulated it.
* Torch idioms (torch_idioms.py): `param.grad` shows the gradient the engine holds, so
  `torch.nn.utils.clip_grad_norm_` works; a torch optimizer over the parameters raises.
"""
from __future__ import annotations

import contextlib

from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from tierflow.runtime import torch_idioms


@dataclass(frozen=True)
class SavedUnitView:
    """What autograd keeps instead of a view of a unit's device buffer."""

    uid: int
    size: torch.Size
    stride: tuple
    offset: int        # elements from the start of the unit's buffer (not of its storage)


class OnDemandFetch(TorchFunctionMode):
    """Fetches parameters whose data is not on the device when an op receives them."""

    def __init__(self, engine, passes):
        super().__init__()
        self.engine, self.passes = engine, passes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.engine.busy:
            return func(*args, **kwargs)
        owner = self.engine.param_owner
        for arg in args:
            if isinstance(arg, nn.Parameter) and id(arg) in owner:
                self.passes.ensure_resident(owner[id(arg)])
            elif isinstance(arg, (list, tuple)):
                for item in arg:
                    if isinstance(item, nn.Parameter) and id(item) in owner:
                        self.passes.ensure_resident(owner[id(item)])
        for value in kwargs.values():
            if isinstance(value, nn.Parameter) and id(value) in owner:
                self.passes.ensure_resident(owner[id(value)])
        return func(*args, **kwargs)


class ForwardContext:
    """Entered by the root module's pre-hook, left by its post-hook: the contexts that
    must surround the whole forward pass (saved-tensor hooks, on-demand fetching)."""

    def __init__(self, engine, passes):
        self.engine, self.passes = engine, passes
        self._stack = []

    def enter(self) -> None:
        saved = torch.autograd.graph.saved_tensors_hooks(self.passes.pack_saved, self.passes.unpack_saved)
        mode = OnDemandFetch(self.engine, self.passes) if self.engine.fetches_on_demand else contextlib.nullcontext()
        saved.__enter__()
        mode.__enter__()
        self._stack.append((saved, mode))

    def exit(self) -> None:
        saved, mode = self._stack.pop()
        mode.__exit__(None, None, None)
        saved.__exit__(None, None, None)


def install(engine, passes, model: nn.Module, hooked: dict[nn.Module, set[int]]) -> list:
    """Register every hook, calling `passes` (passes.py); returns the handles (to remove on close)."""
    handles = []
    context = ForwardContext(engine, passes)

    def root_pre(module, args):
        context.enter()
        passes.begin_forward()

    def root_post(module, args, output):
        try:
            passes.end_forward()
        finally:
            context.exit()

    # Registered first, so the root's contexts surround its own unit hooks.
    handles.append(model.register_forward_pre_hook(root_pre))
    for module, uids in hooked.items():
        ordered = sorted(uids)

        def pre(module, args, _uids=ordered):
            passes.enter_module(_uids)

        def post(module, args, output, _uids=ordered):
            passes.exit_module(_uids)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))
    handles.append(model.register_forward_hook(root_post, always_call=True))

    for unit in engine.units:
        for slot in unit.slots:
            if slot.trainable:
                handles.append(slot.param.register_post_accumulate_grad_hook(
                    lambda param, _unit=unit, _slot=slot: passes.on_grad(_unit, _slot, param)))
    handles.append(torch_idioms.adopt(engine))  # its remove() gives the parameters back
    return handles
