"""Memory-centric tiling: a linear layer too big for the device runs in tiles fetched one at a time.

The engine moves whole parameters, and needs a unit in use, one in flight and its
gradient on the device at once. A single `nn.Linear` whose weight alone is a large
share of the device budget (a huge vocabulary head or MLP) would make the plan fail.
Before the model is partitioned, such a layer is replaced (in its parent, no model
code edited) by a `TiledLinear` whose output features are split into tiles, each an
`nn.Linear` of its own: each tile becomes its own unit, so the engine's hooks fetch
one tile, compute its slice of the output, release it and prefetch the next.

The forward output is the concatenation of the tiles' outputs (each output element
is the same dot product as before). The gradient of the input sums the tiles'
contributions, so it equals the untiled one up to rounding, not bitwise.

`Engine.state_dict()` merges the tiles back under the original names (`merge`).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class TiledLinear(nn.Module):
    """`nn.Linear(in_features, out_features)` computed as `len(tiles)` slices of its outputs."""

    def __init__(self, linear: nn.Linear, tile_rows: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.has_bias = linear.bias is not None
        self.tiles = nn.ModuleList()
        for start in range(0, linear.out_features, tile_rows):
            rows = min(tile_rows, linear.out_features - start)
            tile = nn.Linear(linear.in_features, rows, bias=self.has_bias, device="meta")
            tile.weight = nn.Parameter(linear.weight.detach()[start:start + rows].clone(),
                                       requires_grad=linear.weight.requires_grad)
            if self.has_bias:
                tile.bias = nn.Parameter(linear.bias.detach()[start:start + rows].clone(),
                                         requires_grad=linear.bias.requires_grad)
            self.tiles.append(tile)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each tile module runs on its own, so its hooks fetch and release just that tile.
        return torch.cat([tile(x) for tile in self.tiles], dim=-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tiles={len(self.tiles)}"


def tile_oversized(model: nn.Module, max_bytes: int, tile_bytes: int, dtype: torch.dtype):
    """Replace every `nn.Linear` whose parameters exceed `max_bytes` (in `dtype`) by a
    `TiledLinear` of tiles of about `tile_bytes`. Returns ({module name: tiles}, undo), undo
    being (parent, attribute, original module) triples.

    Linear layers whose weight is shared with another module (tied embeddings) are left
    alone: their parameter must stay one tensor."""
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    tiled, undo = {}, []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        nbytes = sum(p.numel() for p in module.parameters()) * dtype.itemsize
        if nbytes <= max_bytes or any(counts[id(p)] > 1 for p in module.parameters()):
            continue
        row_bytes = (module.in_features + (module.bias is not None)) * dtype.itemsize
        rows = max(1, tile_bytes // row_bytes)
        replacement = TiledLinear(module, rows)
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, replacement)
        undo.append((parent, leaf, module))
        tiled[name] = math.ceil(module.out_features / rows)
    return tiled, undo


def merge(state: dict, tiled: dict[str, int]) -> dict:
    """A state dict with each tiled layer's tiles concatenated back under its own keys."""
    if not tiled:
        return state
    out = {}
    pending: dict[str, list] = {}
    for key, value in state.items():
        for name in tiled:
            prefix = f"{name}.tiles." if name else "tiles."
            if key.startswith(prefix):
                index, _, leaf = key[len(prefix):].partition(".")
                target = f"{name}.{leaf}" if name else leaf
                pending.setdefault(target, [None] * tiled[name])[int(index)] = value
                if target not in out:
                    out[target] = None  # keeps the original key order
                break
        else:
            out[key] = value
    for target, parts in pending.items():
        out[target] = torch.cat(parts, dim=0)
    return out



def tile_target(key: str, tiled: dict[str, int]) -> tuple[str, int] | None:
    """(original key, tile index) of a tile's parameter key, or None for any other key."""
    for name in tiled:
        prefix = f"{name}.tiles." if name else "tiles."
        if key.startswith(prefix):
            index, _, leaf = key[len(prefix):].partition(".")
            return (f"{name}.{leaf}" if name else leaf), int(index)
    return None
