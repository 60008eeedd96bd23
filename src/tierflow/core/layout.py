"""Partition a model into fetch units and lay out each unit's parameters flat.

A unit is a module subtree whose parameters move between tiers together: one
fetch, one flat buffer on the device, one optimizer pass. Each parameter
belongs to exactly one unit (tied parameters to the first module that owns
them); modules that use a parameter of another unit name that unit as a
dependency, so their hooks fetch it too.

Inside a unit, trainable parameters come first so that gradients and Adam
moments cover one contiguous prefix, and every parameter starts on a
2048-element boundary so that each parameter segment is 4 KiB aligned on
NVMe (O_DIRECT reads and writes a parameter on its own).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from tierflow.core import quant
from tierflow.errors import ConfigError

SEGMENT_ALIGN = 2048  # elements: 4 KiB of bf16, 8 KiB of fp32 (O_DIRECT alignment)


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


@dataclass
class Slot:
    """One parameter's place in its unit's flat buffers."""

    name: str
    param: nn.Parameter
    shape: torch.Size
    numel: int
    offset: int          # element offset in the unit's flat buffers
    trainable: bool
    index: int = -1      # position in model.parameters() order (for exact global norms)


@dataclass
class Unit:
    """A group of parameters fetched, released and updated together."""

    uid: int
    name: str
    module: nn.Module
    slots: list[Slot] = field(default_factory=list)
    numel: int = 0            # padded elements of all parameters
    trainable_numel: int = 0  # padded elements of the trainable prefix
    weights: str | None = None  # a frozen unit's compressed format ("int8" / "int4", quant.py)

    def finalize(self, world_size: int = 1) -> None:
        """Order slots (trainable first) and assign aligned offsets. With `world_size` ranks the
        buffers are padded to world_size equal, aligned shards (no change for one rank)."""
        self.slots.sort(key=lambda s: not s.trainable)
        offset = 0
        for slot in self.slots:
            slot.offset = offset
            offset += _round_up(slot.numel, SEGMENT_ALIGN)
            if slot.trainable:
                self.trainable_numel = offset
        self.numel = _round_up(max(offset, 1), SEGMENT_ALIGN * world_size) if world_size > 1 else offset


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def is_fused_experts(module: nn.Module) -> bool:
    """A mixture of experts' expert weights kept fused, as transformers 5 does (`gate_up_proj`
    [experts, 2 x intermediate, hidden], `down_proj` [experts, hidden, intermediate]): a
    module with an integer `num_experts`, no submodule parameters, and only direct parameters
    whose first dimension is the expert (at least one of them 3-D)."""
    count = getattr(module, "num_experts", None)
    params = list(module.parameters(recurse=False))
    return (isinstance(count, int) and count > 1 and bool(params)
            and len(params) == sum(1 for _ in module.parameters())
            and all(p.dim() >= 2 and p.shape[0] == count for p in params) and any(p.dim() == 3 for p in params))


def is_routed(module: nn.Module) -> bool:
    """Fused experts fetched expert by expert (runtime/experts.py): frozen ones whose forward
    takes the router's choice as `top_k_index`. Their module is a unit of its own and gets no
    fetch hook; trainable experts stream as a whole, as any unit."""
    if not is_fused_experts(module) or any(p.requires_grad for p in module.parameters()):
        return False
    try:
        return "top_k_index" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _holds_routed(module: nn.Module) -> bool:
    return any(is_routed(m) for m in module.modules())


def partition(model: nn.Module, unit_bytes: int, allow_meta: bool = False, world_size: int = 1,
              weights: str | None = None) -> tuple[list[Unit], dict[nn.Module, set[int]]]:
    """Split `model` into units of at most ~`unit_bytes` parameter bytes.

    Returns the units and, for every module that needs hooks, the set of unit ids it
    must have resident while it runs. `allow_meta`: parameters may be on the meta
    device (their values come from elsewhere). `world_size`: data-parallel ranks sharing
    the state (see distributed.py). `weights`: a compressed format for frozen weights
    (quant.py): frozen and trainable parameters of a module then go to separate units (the
    frozen base under LoRA adapters is compressed, the adapters are not).
    """
    _check_params(model, allow_meta)
    # Data-parallel ranks gather whole units, and compressed weights are read whole: experts are
    # then not routed (read expert by expert), they stream as any unit.
    route = world_size == 1 and weights is None
    if weights is not None:
        check_compressible(model, weights, world_size)
    owner: dict[int, Unit] = {}
    units: list[Unit] = []
    hooked: dict[nn.Module, set[int]] = {}

    def claim(module: nn.Module, name: str, params) -> None:
        split = {}  # frozen or not -> its unit (one unit unless compressing)
        for pname, param in params:
            if id(param) in owner:
                continue
            kind = weights is not None and not param.requires_grad
            unit = split.get(kind)
            if unit is None:
                unit = split[kind] = Unit(uid=len(units), name=name or "<root>", module=module,
                                          weights=weights if kind else None)
                units.append(unit)
            slot = Slot(pname, param, param.shape, param.numel(), 0, param.requires_grad)
            unit.slots.append(slot)
            owner[id(param)] = unit

    def visit(module: nn.Module, prefix: str) -> None:
        if _param_bytes(module) <= unit_bytes and (is_routed(module) or not route or not _holds_routed(module)):
            claim(module, prefix, module.named_parameters(prefix=prefix, remove_duplicate=True))
            return
        claim(module, prefix, module.named_parameters(prefix=prefix, recurse=False))
        for child_name, child in module.named_children():
            visit(child, f"{prefix}.{child_name}" if prefix else child_name)

    visit(model, "")
    for unit in units:
        unit.finalize(world_size)
    order = {id(p): i for i, p in enumerate(model.parameters())}
    for unit in units:
        for slot in unit.slots:
            slot.index = order[id(slot.param)]
    _assign_hooks(model, owner, hooked, unit_bytes, route)
    return units, hooked


def _assign_hooks(model, owner, hooked, unit_bytes, route: bool = True) -> None:
    """Decide which modules get fetch hooks and which units each must hold.

    A unit root needs every unit its subtree uses (its own, plus tied parameters
    owned elsewhere). Below a unit root nothing is hooked; above, a module with
    direct parameters (its own unit or a tied one) is hooked for those.
    """
    def visit(module: nn.Module) -> None:
        if route and is_routed(module):
            return  # its experts are fetched one by one as the router picks them (runtime/experts.py)
        if _param_bytes(module) <= unit_bytes and not (route and _holds_routed(module)):
            needed = {owner[id(p)].uid for p in module.parameters()}
            if needed:
                hooked[module] = needed
            return
        direct = {owner[id(p)].uid for p in module.parameters(recurse=False)}
        if direct:
            hooked[module] = direct
        for child in module.children():
            visit(child)

    visit(model)


def _check_params(model: nn.Module, allow_meta: bool = False) -> None:
    """Reject what the engine cannot tier, before any work starts."""
    for name, param in model.named_parameters():
        if not param.dtype.is_floating_point:
            raise ConfigError(f"parameter {name} has dtype {param.dtype}: tierflow tiers floating-point "
                              f"parameters only; register it as a buffer (module.register_buffer) or "
                              f"cast it to a floating-point dtype")
        if param.device.type == "meta" and not allow_meta:
            raise ConfigError(f"parameter {name} is on the meta device (no data): materialise the model "
                              f"first (e.g. model.to_empty(device='cpu') and initialise it, or "
                              f"from_pretrained / from_config without a meta-device context)")
        if param.is_sparse or not param.is_contiguous() and param.layout != torch.strided:
            raise ConfigError(f"parameter {name} is not a dense strided tensor: unsupported")
    if not any(True for _ in model.parameters()):
        raise ConfigError("the model has no parameters: nothing to offload")


def check_compressible(model: nn.Module, weights: str, world_size: int) -> None:
    """A compressed format needs frozen parameters that split into whole groups (quant.py)."""
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    if not frozen:
        raise ConfigError(f"weights={weights!r} compresses frozen parameters only, and every parameter of the "
                          f"model is trainable: load it for inference (trainable=False), freeze the base "
                          f"(e.g. PEFT LoRA adapters), or pass weights=None")
    if world_size > 1:
        raise ConfigError(f"weights={weights!r} is not supported with data-parallel ranks (world size "
                          f"{world_size}): run one process or pass weights=None")
    for name, param in frozen:
        quant.check_groupable(name, param.shape, param.numel(), weights)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The one floating dtype of a model's parameters (float32 if it has none)."""
    dtypes = {p.dtype for p in model.parameters() if p.dtype.is_floating_point}
    if len(dtypes) > 1:
        raise ConfigError(f"the model mixes parameter dtypes {sorted(map(str, dtypes))}: cast it to one "
                          f"dtype first (e.g. model.float())")
    return dtypes.pop() if dtypes else torch.float32


def default_unit_bytes(cfg, model: nn.Module | None = None) -> int:
    """About an eighth of the device budget, so several units fit in flight; 256 MiB at most."""
    if cfg.device_memory is None:
        return 256 * 2**20
    return max(1, min(256 * 2**20, cfg.device_memory // 8))


def checked_source(value: torch.Tensor, slot: Slot) -> torch.Tensor:
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


# ---- the arrays of a unit's training state (their homes: memory/tiers.py) ---------------------

FP32 = torch.float32
ALIGN = 4096  # O_DIRECT alignment of every array on disk


def array_specs(unit: Unit, compute_dtype: torch.dtype, shard=None) -> dict[str, tuple[int, torch.dtype]]:
    """Name -> (elements, dtype) of every array a unit keeps (of shard [lo, hi) if given). A
    unit with no trainable parameter is never updated, so it keeps only its compute-dtype
    weights (inference)."""
    lo, hi = (0, unit.numel) if shard is None else (shard.lo, shard.hi)
    if unit.weights is not None:  # frozen, compressed: one byte array (quant.py)
        return {"qweights": (quant.packed_nbytes(unit, compute_dtype), torch.uint8)}
    if not unit.trainable_numel and compute_dtype != FP32:
        return {"weights": (hi - lo, compute_dtype)}
    trainable = max(0, min(hi, unit.trainable_numel) - lo)
    specs = {"master": (hi - lo, FP32)}
    if compute_dtype != FP32:
        specs["weights"] = (hi - lo, compute_dtype)
    if trainable:
        for name in ("grad", "exp_avg", "exp_avg_sq"):
            specs[name] = (trainable, FP32)
    return specs


def stored_grad_bytes(home: str, compute_dtype: torch.dtype) -> int:
    """Bytes per parameter of a fresh gradient in its home: a 2-byte compute dtype's gradient
    stays in that dtype off the device (the "packed" form, runtime/gradients.py; one
    micro-batch per step), fp32 otherwise."""
    return 2 if compute_dtype.itemsize == 2 and home != "device" else 4


ARRAY_CLASS = {"master": "master", "weights": "weights", "qweights": "weights", "grad": "grads",
               "exp_avg": "moments", "exp_avg_sq": "moments"}
