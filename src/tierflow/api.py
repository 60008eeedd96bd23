"""The public API: `offload`, `load`, `resume`, and the `Engine` a user holds.

This module sits on top of the runtime, checkpoint and inference layers
(docs/architecture.md): the engine's `save`, `save_pretrained` and `generate` are theirs,
and `load` / `resume` hand them `offload` to build engines with.
"""
from __future__ import annotations

import os

from torch import nn

from tierflow import checkpoint
from tierflow.config import OffloadConfig, check_option_names
from tierflow.errors import ConfigError
from tierflow.runtime import engine as runtime_engine
from tierflow.runtime.layers import check_layers


class Engine(runtime_engine.Engine):
    """A model whose training state is tiered across device, host and NVMe.

    Create it with `tierflow.offload` (or `load`, `resume`). Call it like the model.
    """

    last_generation = None  # the GenerationReport of the last engine.generate(...)

    def save(self, path, scheduler=None, extra=None):
        """A crash-safe checkpoint of the whole training state (tierflow/checkpoint/state.py)."""
        return checkpoint.save(self, path, scheduler=scheduler, extra=extra)

    def save_pretrained(self, out_dir, max_shard_size="2GiB", dtype=None):
        """Hugging Face format: config.json + safetensors shards (tierflow/checkpoint/hf.py)."""
        return checkpoint.save_pretrained(self, out_dir, max_shard_size=max_shard_size, dtype=dtype)

    def generate(self, *args, kv_cache: str = "auto", **kwargs):
        """transformers' generate over the tiered model, KV cache placed by the budgets (infer/)."""
        from tierflow.infer.generate import generate  # imports transformers: only when generating

        return generate(self, *args, kv_cache=kv_cache, **kwargs)


def load(path, device="cpu", device_memory=None, host_memory=None, nvme=None, dtype=None,
         placement: str = "auto", model_class=None, trainable: bool = True, **options) -> Engine:
    """An engine over the Hugging Face model in directory `path`, streamed in tensor by tensor
    (see tierflow.checkpoint.hf.load). With `trainable=False, weights="int8"|"int4"` each weight
    is quantized as it streams in and kept compressed (see `offload`)."""
    return checkpoint.load(path, device=device, device_memory=device_memory, host_memory=host_memory, nvme=nvme,
                           dtype=dtype, placement=placement, model_class=model_class, trainable=trainable,
                           make_engine=offload, **options)


def resume(path, model: nn.Module | None = None, **kwargs):
    """Rebuild the engine and optimizer of checkpoint `path` and continue exactly (see
    tierflow.checkpoint.state.resume for the arguments)."""
    return checkpoint.resume(path, model, make_engine=offload, **kwargs)


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
        activations: what happens to the tensors autograd saves for backward: "keep" (on
            the device, accounted), "recompute" (checkpoint every layer), "offload" (to host
            memory, NVMe when host is short, and back ahead of backward), "auto" (per layer,
            from the budgets) or "autograd" (left to autograd, not accounted). None (the
            default): "auto" on a GPU with a `device_memory` budget, so that the budget bounds
            the engine's whole use of the GPU; "autograd" otherwise. See docs/activations.md.
        **options: advanced knobs of `OffloadConfig` (unit_bytes, prefetch_bytes, chunk_bytes,
            staging_buffers, io_threads, direct_io, update_on, batch_shape), and `weights`: None,
            "int8" or "int4" (NF4) to keep frozen weights compressed in their tier and dequantize
            them on the device before use (inference, or the frozen base under LoRA; see
            docs/inference.md#compressed-weights).

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
    check_option_names(options)
    cfg = OffloadConfig.create(device=device, device_memory=device_memory, host_memory=host_memory,
                               nvme=nvme, dtype=dtype, activations=activations, **options)
    check_layers(model, cfg.activations)  # recompute needs layers to recompute: said before any work
    return Engine(model, cfg, placement=placement, source=source)
