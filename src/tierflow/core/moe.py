"""What a mixture of experts reads per decode step when experts are fetched as routed (pure).

A decode step of `tokens` tokens (the batch) sends each token to `top_k` of a layer's `experts`
experts. With the router's choices spread evenly, the expected number of distinct experts a
layer uses is E * (1 - (1 - k/E)^tokens): a step reads those experts only (runtime/experts.py),
not all E. `tierflow plan` prints this for MoE models; real routers are skewed, which only lowers
the figure (and the expert cache lowers it further: hits read nothing).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tierflow.core.layout import is_fused_experts


@dataclass(frozen=True)
class MoeShape:
    """The experts of a model: layers of fused experts, experts per layer, experts per token."""

    layers: int
    experts: int
    top_k: int
    expert_bytes: int   # one expert's weights (all its fused parameters' rows), compute dtype
    total_bytes: int    # all experts of all layers

    def experts_per_step(self, tokens: int) -> float:
        """Expected distinct experts one layer uses for `tokens` tokens (even routing)."""
        k, e = min(self.top_k, self.experts), self.experts
        return e * (1.0 - (1.0 - k / e) ** max(tokens, 0))

    def routed_bytes(self, tokens: int) -> float:
        """Expected expert bytes a decode step of `tokens` tokens reads, all layers."""
        return self.layers * self.experts_per_step(tokens) * self.expert_bytes


def moe_shape(model: nn.Module, dtype: torch.dtype) -> MoeShape | None:
    """The model's MoeShape, or None without fused experts or a known experts-per-token."""
    layers = [m for m in model.modules() if is_fused_experts(m)]
    config = getattr(model, "config", None)
    top_k = getattr(config, "num_experts_per_tok", None) or getattr(config, "top_k", None)
    if not layers or not isinstance(top_k, int):
        return None
    experts = max(m.num_experts for m in layers)
    total = sum(p.numel() for m in layers for p in m.parameters()) * dtype.itemsize
    per_expert = max(sum(p.numel() for p in m.parameters()) // m.num_experts for m in layers) * dtype.itemsize
    return MoeShape(len(layers), experts, top_k, per_expert, total)
