"""tierflow: train models larger than memory by tiering state across device, host and NVMe.

    engine = tierflow.offload(model, device="cpu", device_memory="1GiB", host_memory="2GiB", nvme="/spill")
    opt = tierflow.AdamW(engine, lr=1e-4)
"""
from __future__ import annotations

import os

from torch import nn

from tierflow.config import OffloadConfig, format_size, parse_size
from tierflow.runtime.engine import Engine
from tierflow.errors import BudgetError, ConfigError, EngineFailedError, NonFiniteError, NvmeError, TierflowError
from tierflow.runtime.updates import AdamW
from tierflow.core.plan import Variant

__all__ = ["offload", "Engine", "AdamW", "OffloadConfig", "Variant", "parse_size", "format_size",
           "TierflowError", "ConfigError", "BudgetError", "NvmeError", "NonFiniteError", "EngineFailedError",
           "resume", "load", "save_pretrained", "CheckpointError"]
__version__ = "0.1.0"

from tierflow.checkpoint import CheckpointError, load, resume, save, save_pretrained  # noqa: E402

Engine.save = save                        # engine.save("ckpt/step-N", scheduler=..., extra=...)
Engine.save_pretrained = save_pretrained  # engine.save_pretrained("out/"): Hugging Face format
Engine.last_generation = None             # the GenerationReport of the last engine.generate(...)


def _generate(engine, *args, kv_cache: str = "auto", **kwargs):
    """transformers' generate over the tiered model, KV cache placed by the budgets (infer.py)."""
    from tierflow.infer.generate import generate  # imports transformers: only when generating

    return generate(engine, *args, kv_cache=kv_cache, **kwargs)


Engine.generate = _generate


def offload(model: nn.Module, device="cpu", device_memory=None, host_memory=None, nvme=None,
            dtype=None, placement: str = "auto", source=None, activations=None, plan: str | None = None,
            **options) -> Engine:
    """Tier `model`'s parameters, gradients and AdamW state within the given budgets.

    Args:
        model: any torch.nn.Module with floating-point parameters (materialised, not meta).
        device: compute device, "cpu" or "cuda".
        device_memory / host_memory: budgets such as "8GiB" (None = no limit).
        nvme: directory for state that fits neither budget (created if missing).
        dtype: compute dtype of weights on the device (default: the model's own); master
            weights and Adam moments stay fp32.
        plan / placement (the same knob; `plan` is its name in `tierflow plan`'s terms):
            "auto" (the placement with the least predicted step time within the budgets, see
            planner.py; the same as `tierflow plan` shows), "greedy" (nearest tier first, in
            model order, without the cost model), force every unit's state into "device",
            "host" or "nvme", or a `tierflow.Variant` (spend the budgets exactly so).
        source: optional callable (parameter name) -> tensor with each parameter's initial
            value, read one tensor at a time (checkpoints, safetensors shards); the model's
            parameters may then be on the meta device, so it is never whole in memory.
        activations: what happens to the tensors autograd saves for backward: None (default:
            left to autograd, not accounted), "keep" (on the device, accounted), "recompute"
            (checkpoint every layer), "offload" (to host memory, NVMe when host is short, and
            back ahead of backward) or "auto" (per layer, from the budgets). See
            docs/activations.md.
        **options: advanced knobs of `OffloadConfig` (unit_bytes, prefetch_bytes, chunk_bytes,
            staging_buffers, io_threads, direct_io, update_on, batch_shape).

    Returns the `Engine`; call it like the model. `model` may also be the path of a Hugging
    Face model directory: see `tierflow.load`.
    """
    if plan is not None:
        if placement not in ("auto", plan):
            raise ConfigError(f"plan={plan!r} and placement={placement!r} disagree: pass one of them")
        placement = plan
    if isinstance(model, (str, os.PathLike)) and os.path.isdir(model):
        return load(model, device=device, device_memory=device_memory, host_memory=host_memory, nvme=nvme,
                    dtype=dtype, placement=placement, activations=activations, **options)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"tierflow.offload expects a torch.nn.Module, got {type(model).__name__}")
    cfg = OffloadConfig.create(device=device, device_memory=device_memory, host_memory=host_memory,
                               nvme=nvme, dtype=dtype, activations=activations, **options)
    return Engine(model, cfg, placement=placement, source=source)
