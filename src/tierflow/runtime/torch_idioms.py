"""Torch idioms over an engine's parameters either work exactly or fail loudly, never silently.

The engine drains each gradient out of the device the moment autograd has it (passes.py sets
`param.grad = None`), so without this module `torch.nn.utils.clip_grad_norm_(engine.parameters(),
c)` would see no gradients, return 0 and clip nothing, and a `torch.optim` optimizer over the
engine's parameters would step over nothing. Two mechanisms:

* **`param.grad` is a view of the gradient held in the tiers.** While an engine lives, each of
  its trainable parameters gets a subclass of its own parameter class (an `__class__` swap, as
  `torch.nn.UninitializedParameter.materialize` does; undone at `engine.close()`) whose
  Python-level `.grad` returns, for a parameter whose gradient the engine holds, a
  `TieredGradient`: a storage-less tensor of the gradient's shape, dtype and device. Autograd
  never sees it (it reads torch's own `.grad`, which stays None), so backward, accumulation and
  the drain are unchanged. On a `TieredGradient`, `torch.linalg.vector_norm` / `Tensor.norm` /
  `torch._foreach_norm` (L2) return the norm the drain recorded (the exact norm torch takes of
  that gradient), and `mul_` / `torch._foreach_mul_` by one coefficient over every gradient the
  engine holds becomes the engine's clip coefficient (gradients.py: AdamW applies it). So
  `torch.nn.utils.clip_grad_norm_` (also `get_total_norm` + `clip_grads_with_norm_`) returns
  torch's exact total norm and clips exactly as `opt.clip_grad_norm_` does, with no pass over
  the tiers. `param.grad = None` (`model.zero_grad()`) and `param.grad.zero_()` drop the held
gradient, as torch would. Anything else done with it (reading values, `clip_grad_value_`, a subset of the
  parameters, data-parallel ranks) raises `UnsupportedError` naming `opt.clip_grad_norm_`.
* **A global optimizer step pre-hook** (`torch.optim.optimizer.register_optimizer_step_pre_hook`,
  registered at the first engine): an optimizer other than `tierflow.AdamW` whose parameters
  include one of a live engine's raises `UnsupportedError` naming `tierflow.AdamW` at its first
  `step()`, before it changes anything. Without a live engine the hook returns at once.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tierflow.errors import UnsupportedError
from tierflow.runtime.optimizer import AdamW

TORCH_GRAD = nn.Parameter.grad  # torch's own `.grad` (what autograd reads and writes)

CLIP_HINT = ("clip with the optimizer: opt = tierflow.AdamW(engine, ...); opt.clip_grad_norm_(max_norm) "
             "(exact global L2 norm over every tier)")


class Owner:
    """What `.grad` of one engine parameter needs: the engine's gradient sink and the slot."""

    __slots__ = ("param", "sink", "index", "name")

    def __init__(self, param, sink, index: int, name: str):
        self.param, self.sink, self.index, self.name = weakref.ref(param), weakref.ref(sink), index, name


OWNERS: dict[int, Owner] = {}      # id(parameter) -> its Owner, for every live engine's parameters
SUBCLASSES: dict[type, type] = {}  # parameter class -> its tiered subclass
HOOK = []                          # the optimizer step pre-hook's handle, once registered


def owner_of(param) -> Owner | None:
    owner = OWNERS.get(id(param))
    return owner if owner is not None and owner.param() is param else None


class TieredGradient(torch.Tensor):
    """`param.grad` of an engine parameter whose gradient is held in the engine's tiers."""

    @staticmethod
    def __new__(cls, param, owner: Owner):
        grad = torch.Tensor._make_wrapper_subclass(cls, param.shape, dtype=param.dtype, device=param.device)
        grad.owner = owner
        return grad

    def __repr__(self):
        return (f"TieredGradient(shape={tuple(self.shape)}, dtype={self.dtype}: the gradient of "
                f"{self.owner.name}, held in a tierflow engine's tiers)")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "__get__" or func in METADATA:  # shape, dtype, device, ...
            return super().__torch_function__(func, types, args, kwargs)
        if func is torch.linalg.vector_norm or func is torch.Tensor.norm:
            return norm_of(func, *args, **kwargs)
        if func is torch._foreach_norm:
            return [norm_of(torch.linalg.vector_norm, t, *args[1:], **kwargs) for t in args[0]]
        if func is torch.Tensor.zero_:  # model.zero_grad(set_to_none=False)
            sink_of(args[0], "zeroing it").forget(args[0].owner.index)
            return args[0]
        if func is torch.Tensor.requires_grad_ and (args[1:] == (False,) or kwargs == {"requires_grad": False}):
            return args[0]  # it never requires grad
        if func is torch.Tensor.mul_ and not kwargs:
            scale(args[0], args[1])
            return args[0]
        if func is torch._foreach_mul_ and not kwargs and len(args) == 2:
            for tensor in args[0]:
                scale(tensor, args[1])
            return None
        raise unsupported(args, f"{getattr(func, '__name__', func)} on it")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise unsupported(args, f"{func} on it")


METADATA = {torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.stride,
            torch.Tensor.element_size, torch.Tensor.is_floating_point, torch.Tensor.__len__}


def first_gradient(args):
    for arg in args:
        if isinstance(arg, TieredGradient):
            return arg
        if isinstance(arg, (list, tuple)):
            found = first_gradient(arg)
            if found is not None:
                return found
    return None


def unsupported(args, what: str) -> UnsupportedError:
    grad = first_gradient(args)
    name = grad.owner.name if grad is not None else "a parameter"
    return UnsupportedError(
        f"the gradient of {name} is held in a tierflow engine's tiers (param.grad is a TieredGradient, "
        f"without values): {what} is not supported. torch.nn.utils.clip_grad_norm_ over all of the "
        f"engine's parameters works (exact L2 norm); otherwise {CLIP_HINT}; "
        f"engine.read_array(unit, slot, 'grad') reads a gradient's values")


def sink_of(grad: TieredGradient, what: str):
    sink = grad.owner.sink()
    if sink is None or grad.owner.index not in sink.has_grad:
        raise unsupported((grad,), f"{what} (this gradient is gone: the optimizer stepped or the engine closed)")
    return sink


def norm_of(func, tensor, ord=2, dim=None, keepdim=False, dtype=None, *, out=None, p=None):
    """L2 norm of a held gradient, as the drain recorded it (after this step's clips)."""
    ord = p if p is not None else ord  # Tensor.norm(p=...)
    if not isinstance(tensor, TieredGradient):
        return func(tensor, ord, dim, keepdim, dtype=dtype)
    if ord not in (2, 2.0, "fro", None) or dim is not None or out is not None:
        raise unsupported((tensor,), f"a norm other than the L2 norm of the whole gradient (ord={ord!r}, dim={dim!r})")
    norm = sink_of(tensor, "its norm").slot_norm(tensor.owner.index)
    return norm if dtype is None else norm.to(dtype)


def scale(tensor, coefficient) -> None:
    if not isinstance(tensor, TieredGradient):
        tensor.mul_(coefficient)
        return
    if isinstance(coefficient, torch.Tensor) and coefficient.numel() != 1:
        raise unsupported((tensor,), "multiplying it by a tensor that is not one number")
    sink_of(tensor, "scaling it").scale_slot(tensor.owner.index, coefficient)


def tiered_class(cls: type) -> type:
    """`cls` with a `.grad` that shows the gradient the engine holds."""
    if cls not in SUBCLASSES:
        def grad_get(self):
            grad = TORCH_GRAD.__get__(self)
            if grad is not None:
                return grad
            owner = owner_of(self)
            sink = owner.sink() if owner is not None else None
            if sink is None or owner.index not in sink.has_grad:
                return None
            return TieredGradient(self, owner)

        def grad_set(self, value):
            if value is None and TORCH_GRAD.__get__(self) is None:  # e.g. model.zero_grad()
                owner = owner_of(self)
                sink = owner.sink() if owner is not None else None
                if sink is not None:
                    sink.forget(owner.index)  # as torch drops it: the next backward starts afresh
            TORCH_GRAD.__set__(self, value)

        def grad_del(self):
            TORCH_GRAD.__delete__(self)

        SUBCLASSES[cls] = type(f"Tiered{cls.__name__}", (cls,), {
            "grad": property(grad_get, grad_set, grad_del, TORCH_GRAD.__doc__),
            "__module__": __name__, "__doc__": f"{cls.__name__} of a tierflow engine's model."})
    return SUBCLASSES[cls]


def refuse_foreign_optimizers(optimizer, args, kwargs) -> None:
    """Global optimizer step pre-hook: a torch optimizer over a live engine's parameters."""
    if not OWNERS or isinstance(optimizer, AdamW):
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            owner = owner_of(param)
            if owner is not None and owner.sink() is not None:
                raise UnsupportedError(
                    f"{type(optimizer).__module__}.{type(optimizer).__name__} was given the parameters of a "
                    f"tierflow engine (e.g. {owner.name}): the engine moves gradients out of the device and "
                    f"keeps master weights and AdamW state in its tiers, so this optimizer would update "
                    f"nothing. Use opt = tierflow.AdamW(engine, lr=..., betas=..., weight_decay=...) "
                    f"(torch LR schedulers work on it) and opt.clip_grad_norm_(max_norm) for clipping")


class Adoption:
    """The engine's parameters as adopted; `remove()` (at engine.close) gives them back."""

    def __init__(self, sink, swapped: list, ids: list[int]):
        self.sink, self.swapped, self.ids = sink, swapped, ids

    def remove(self) -> None:
        for key in self.ids:  # entries a later engine over the same parameters made stay
            owner = OWNERS.get(key)
            if owner is not None and owner.sink() in (self.sink, None):
                del OWNERS[key]
        for param, cls in self.swapped:
            if owner_of(param) is None:
                param.__class__ = cls
        self.swapped, self.ids = [], []


def adopt(engine) -> Adoption:
    """Register the engine's parameters (for the optimizer hook) and give its trainable ones
    the `.grad` above."""
    if not HOOK:
        HOOK.append(register_optimizer_step_pre_hook(refuse_foreign_optimizers))
    swapped, ids = [], []
    for unit in engine.units:
        for slot in unit.slots:
            param = slot.param
            OWNERS[id(param)] = Owner(param, engine.grads, slot.index, slot.name)
            ids.append(id(param))
            if not (slot.trainable and isinstance(param, nn.Parameter)):
                continue
            if type(param) in SUBCLASSES.values():  # adopted by an engine still open: given back last
                swapped.append((param, type(param).__bases__[0]))
                continue
            cls = type(param)
            try:
                param.__class__ = tiered_class(cls)
            except TypeError:  # a parameter class whose layout forbids it: .grad stays None
                continue
            swapped.append((param, cls))
    return Adoption(engine.grads, swapped, ids)
