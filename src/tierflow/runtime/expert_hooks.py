"""Installing routed experts (experts.py): find the frozen routed experts modules of a model,
size the CPU stack buffer and the expert cache within the device budget, and wrap each module's
forward with a pre-hook (take the experts the router picked, stacked into compact parameters,
and prefetch the next layer's likely ones) and a post-hook (put the parameters back).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from tierflow.core.layout import is_routed
from tierflow.errors import ConfigError
from tierflow.runtime.experts import CACHE_SHARE, SPARE_EXPERTS, ExpertStore, RoutedLayer

def routed_layers(engine, model: nn.Module) -> list[RoutedLayer]:
    """The routed experts modules that are not attached for good (permanent units need nothing)."""
    owner = {id(s.param): (u, s) for u in engine.units for s in u.slots}
    parents = {id(child): module for module in model.modules() for child in module.children()}
    layers = []
    for name, module in model.named_modules():
        if not is_routed(module) or id(next(module.parameters())) not in owner:
            continue
        unit = owner[id(next(module.parameters()))][0]
        if engine.residency.is_permanent(unit.uid) or unit.weights is not None:
            continue  # (compressed weights are read and dequantized whole: not expert by expert)
        params = {}
        for pname, param in module.named_parameters(recurse=False):
            unit_of, slot = owner[id(param)]
            if unit_of is not unit:
                return []  # split over units: cannot happen with layout.partition; stream as a unit
            params[pname] = (slot, slot.numel // module.num_experts)
        nbytes = sum(per for _, per in params.values()) * engine.compute_dtype.itemsize
        layers.append(RoutedLayer(len(layers), name, module, unit.uid, params,
                                  _router_of(parents.get(id(module)), module), nbytes))
    return layers


def _router_of(parent: nn.Module | None, experts: nn.Module) -> nn.Module | None:
    """The sibling whose `weight` is [experts, hidden]: the router (Mixtral's and Qwen's `gate`)."""
    if parent is None:
        return None
    for child in parent.children():
        weight = getattr(child, "weight", None)
        if child is not experts and isinstance(weight, torch.Tensor) and weight.dim() == 2 \
                and weight.shape[0] == experts.num_experts:
            return child
    return None


def room_plan(engine, layers: list[RoutedLayer]) -> tuple[int, int]:
    """(experts the CPU stack buffer holds, experts per layer kept on the device). What the
    device budget leaves once the streamed units have room (the largest two in use and as
    many in flight; the plan's prefetch window is sized by the largest unit, an experts unit
    here, which is never prefetched whole) goes first to the stack buffer (a whole layer's
    experts if they fit: a prefill's call needs that much anyway), then a share to the cache."""
    experts = max(layer.module.num_experts for layer in layers)
    largest = max(layer.expert_bytes for layer in layers)
    stack_options = () if engine.device.is_cuda else (experts, min(SPARE_EXPERTS, experts))
    budget = engine.budgets["device"]
    if budget.capacity is None:
        return (stack_options[0] if stack_options else 0), experts
    from tierflow.core.plan import working_bytes

    routed = {layer.uid for layer in layers}
    streamed = sorted((working_bytes(u, engine.compute_dtype) for u in engine.units
                       if not engine.residency.is_permanent(u.uid) and u.uid not in routed), reverse=True)
    left = budget.room() - (sum(streamed[:2]) + min(engine.plan.prefetch_bytes, sum(streamed[:2])))
    stack = next((count for count in stack_options if count * largest <= left), 0)
    per_layer = max(0, int((left - stack * largest) * CACHE_SHARE)) // (len(layers) * largest)
    return stack, min(experts, per_layer)


def check_supported(model: nn.Module, units, param_owner: dict, dist) -> None:
    """Said at planning time, before any state moves into the tiers: frozen routed experts are
    fetched expert by expert on one process only (a rank holds only its shard of a unit).
    `param_owner`: id(parameter) -> unit id (the engine's)."""
    if dist is None:
        return
    for name, module in model.named_modules():
        uid = param_owner.get(id(next(module.parameters(), None))) if is_routed(module) else None
        if uid is not None and units[uid].weights is None:
            raise ConfigError(
                f"frozen mixture-of-experts layers with data-parallel ranks are not supported ({name!r} "
                f"is one): run this model in one process, without torchrun / data-parallel ranks")


def install(engine, model: nn.Module) -> tuple[ExpertStore | None, list]:
    """Wrap every routed experts module's forward (module hooks); returns the store (None when
    the model has none) and the hook handles."""
    layers = routed_layers(engine, model)
    if not layers:
        return None, []
    stack, slots = room_plan(engine, layers)
    store = ExpertStore(engine, layers, slots, stack)
    store.make_buffers()
    engine.residency.reclaimers.append(store.reclaim)
    engine.residency.idle_droppers.append(store.drop_idle)
    handles = []
    for layer in layers:
        hook = _Hooks(engine, store, layer)
        handles.append(layer.module.register_forward_pre_hook(hook.pre, with_kwargs=True))
        handles.append(layer.module.register_forward_hook(hook.post, always_call=True))
    return store, handles


class _Hooks:
    """The pre- and post-hook of one routed experts module."""

    def __init__(self, engine, store: ExpertStore, layer: RoutedLayer):
        self.engine, self.store, self.layer = engine, store, layer
        self.signature = inspect.signature(layer.module.forward)
        self.saved: list = []

    def pre(self, module, args, kwargs):
        bound = self.signature.bind(*args, **kwargs)
        index = bound.arguments["top_k_index"]
        hidden = next(iter(bound.arguments.values()))
        if torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            # Training through frozen experts (e.g. LoRA on attention): autograd keeps the
            # weights it saw until backward, so the unit is held whole, as any unit, and its
            # saved views become tokens (passes.pack_saved) instead of stacks outside the budget.
            self.engine.passes.enter_module([self.layer.uid])
            self.saved.append(None)
            return None
        count = module.num_experts
        with self.engine.bookkeeping():
            experts = [e for e in torch.unique(index).tolist() if 0 <= e < count]
            stacked = self.store.take(self.layer, experts)
            self.store.remember_router(self.layer)
            self.store.prefetch_next(self.layer, hidden, index.shape[-1])
        lookup = torch.full((count + 1,), len(experts), dtype=index.dtype, device=index.device)
        lookup[experts] = torch.arange(len(experts), dtype=index.dtype, device=index.device)
        bound.arguments["top_k_index"] = lookup[index.clamp(0, count)]
        # Compact parameters for the duration of this call (plain tensors: no on-demand fetch).
        originals = {name: module._parameters[name] for name in stacked}
        self.saved.append((originals, count, len(experts)))
        module._parameters.update(stacked)
        module.num_experts = len(experts)
        return bound.args, bound.kwargs

    def post(self, module, args, output):
        if not self.saved:
            return
        saved = self.saved.pop()
        if saved is None:
            self.engine.passes.exit_module([self.layer.uid])
            return
        originals, count, used = saved
        module._parameters.update(originals)
        module.num_experts = count
        with self.engine.bookkeeping():
            self.store.release_stack(self.layer, used)
