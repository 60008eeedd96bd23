"""`tierflow.AdamW`: a torch optimizer whose state lives in the engine's tiers.

It keeps no tensors itself: `step()` records the update with a snapshot of each param
group's hyper-parameters (so torch LR schedulers work on `param_groups`), and the engine
applies it to each unit in its home tier (updates.py, steps.py). Its `state_dict()` holds
the hyper-parameters only; the tensors are in the engine's checkpoint.
"""
from __future__ import annotations

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
        if not 0.0 <= lr:
            raise ConfigError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ConfigError(f"invalid betas {betas}: each must be in [0, 1)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused)
        super().__init__(params, defaults)
        self.skip_nonfinite = skip_nonfinite
        self.engine = engine
        engine.attach_optimizer(self)

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
