"""The repeated layers of a model, which `activations=` keeps, offloads or recomputes one by
one, and the buffers of a recomputed layer.

Layers are the children of the model's largest `nn.ModuleList` (a transformer's blocks).
`recompute` needs them: a model without one (everything in an `nn.Sequential`, or layers held
as separate attributes) is refused up front with a message saying what to change, rather
than silently recomputing nothing.

A recomputed layer runs its forward twice: once in forward, once in backward. Anything the
forward updates in place besides its output, such as BatchNorm's running mean, variance and
`num_batches_tracked`, would be updated twice; `buffers_kept` puts back every buffer the
recomputation changed, so the model's buffers end as a plain run leaves them, bit for bit.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from tierflow.errors import ConfigError


def find_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of the model: children of its largest ModuleList (by parameters)."""
    best, best_size = [], 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = list(module), size
    return best


def check_layers(model: nn.Module, mode: str | None) -> None:
    """Refuse `activations='recompute'` on a model without layers to recompute."""
    if mode != "recompute" or not isinstance(model, nn.Module) or find_layers(model):
        return
    raise ConfigError(
        f"activations='recompute' recomputes the blocks of the model's nn.ModuleList (a transformer's "
        f"layers), and this {type(model).__name__} has no nn.ModuleList of two or more blocks with "
        f"parameters: hold its repeated blocks in an nn.ModuleList, or use activations='offload' "
        f"(or 'keep') instead")


@contextlib.contextmanager
def buffers_kept(module: nn.Module):
    """Run the block, then put every buffer of `module` back as it was before. BatchNorm
    updates its running statistics inside the kernel, without bumping their version counter,
    so what changed cannot be told cheaply: all are restored, through `.data`, which leaves
    their version alone (in eval mode BatchNorm saves them for backward, unchanged)."""
    saved = [(b, b.clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, copy in saved:
                buffer.data.copy_(copy)
