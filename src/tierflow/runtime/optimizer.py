"""`tierflow.AdamW`: a torch optimizer whose state lives in the engine's tiers.

It keeps no tensors itself: `step()` records the update with a snapshot of each param
group's hyper-parameters (so torch LR schedulers work on `param_groups`), and the engine
applies it to each unit in its home tier (updates.py, steps.py). Its `state_dict()` holds
the hyper-parameters only; the tensors are in the engine's checkpoint.
"""
from __future__ import annotations

import math

import torch

from tierflow.errors import ConfigError
from tierflow.runtime.updates import HyperParams


class AdamW(torch.optim.Optimizer):
    """AdamW whose state lives in the engine's tiers.

    Args:
        engine: the `tierflow.Engine` returned by `tierflow.offload`.
        params: optional parameters or param groups of `engine.module` (default: all
            trainable parameters, one group).
        lr, betas, eps, weight_decay: as `torch.optim.AdamW`.
        fused: use torch's fused AdamW kernel (fast; equals `torch.optim.AdamW(fused=True)`
            bit for bit). False uses the operations of torch's default AdamW (equal to it
            bit for bit), which is slower.
        skip_nonfinite: a step whose gradients are not finite (NaN or inf) is always skipped
            (no weight or moment changes, as torch.amp.GradScaler does); by default the next
            `step()` (or save) then raises `tierflow.NonFiniteError`. True warns and trains on.
    """

    def __init__(self, engine, params=None, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, fused: bool = True, skip_nonfinite: bool = False):
        if params is None:
            params = [p for p in engine.module.parameters() if p.requires_grad]
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused)
        check_hyper_params(defaults)
        super().__init__(params, defaults)
        self.skip_nonfinite = skip_nonfinite
        self.engine = engine
        engine.attach_optimizer(self)

    def add_param_group(self, param_group: dict) -> None:
        """torch's, with each group's own settings checked too (a group may override them)."""
        super().add_param_group(param_group)
        check_hyper_params(self.param_groups[-1])

    def hyper_params(self) -> dict[int, HyperParams]:
        """id(param) -> its group's current settings."""
        result = {}
        for group in self.param_groups:
            hp = HyperParams(float(group["lr"]), float(group["betas"][0]), float(group["betas"][1]),
                             float(group["eps"]), float(group["weight_decay"]), bool(group["fused"]))
            for param in group["params"]:
                result[id(param)] = hp
        return result

    @torch.no_grad()
    def step(self, closure=None):
        """Record one AdamW step for every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.engine.queue_step(self.hyper_params())
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget accumulated gradients: the next backward starts afresh."""
        self.engine.zero_grad()

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False) -> torch.Tensor:
        """Exact global-norm clipping over every tier; returns the total norm like torch's."""
        return self.engine.clip_grad_norm_(max_norm, norm_type, error_if_nonfinite)

    def state_dict(self) -> dict:
        """Hyper-parameters only: `{"state": {}, "param_groups": [...]}` as torch's optimizers
        write it (lr, betas, eps, weight_decay, fused, a scheduler's initial_lr, parameter
        indices), so wrappers that round-trip an optimizer's state dict (accelerate's
        AcceleratedOptimizer, Hugging Face Trainer's optimizer.pt) work.

        It holds no tensors: the Adam moments, step counts and fp32 master weights live in
        the engine's tiers and are saved with the engine (`engine.save`, resumed with
        `tierflow.resume`); `engine.optimizer_state()` gives them as full tensors. Saving only
        this dict does not checkpoint the optimizer."""
        return super().state_dict()

    def load_state_dict(self, state_dict) -> None:
        """Restore hyper-parameters saved by `state_dict()` (the groups must match in number
        and size). A state dict with per-parameter state (a torch AdamW's moments) is refused:
        tierflow's moments are restored through the engine (`tierflow.resume`)."""
        if state_dict.get("state"):
            raise ConfigError("tierflow.AdamW.load_state_dict takes hyper-parameters only (its 'state' must "
                              "be empty): Adam moments are restored with the engine's checkpoint "
                              "(tierflow.resume), not from another optimizer's state dict")
        super().load_state_dict(state_dict)


def check_hyper_params(group: dict) -> None:
    """Refuse what torch.optim.AdamW refuses, and values that are not finite: an inf learning
    rate or a NaN eps / weight decay turns every weight into NaN at the first step, and the
    checkpoints saved after it would hold NaN weights."""
    lr, eps, weight_decay, betas = group["lr"], group["eps"], group["weight_decay"], group["betas"]
    if not (_finite(lr) and lr >= 0.0):
        raise ConfigError(f"invalid learning rate {lr}: it must be a finite number >= 0")
    if not (_finite(eps) and eps >= 0.0):
        raise ConfigError(f"invalid eps {eps}: it must be a finite number >= 0")
    if not (_finite(weight_decay) and weight_decay >= 0.0):
        raise ConfigError(f"invalid weight_decay {weight_decay}: it must be a finite number >= 0")
    if len(betas) != 2 or not all(_finite(b) and 0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"invalid betas {tuple(betas)}: each must be in [0, 1)")


def _finite(value) -> bool:
    """A finite real number (a 0-dim tensor learning rate, as torch allows, counts)."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError, RuntimeError):  # not a number, or a tensor of several
        return False
