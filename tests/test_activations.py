"""Activation modes (keep, recompute, offload, auto): exact against plain PyTorch, and within
the device budget where keeping every activation is not."""
from __future__ import annotations

import pytest
import torch

import tierflow
from tierflow.activation_policy import LayerStats, choose
from tierflow.errors import BudgetError, ConfigError

from conftest import SMALL_UNITS, assert_bitwise, assert_state_bitwise, make_batches, make_tiny, torch_clip, train

STEPS, LR = 3, 1e-2
MODES = ["keep", "recompute", "offload", "auto"]


def _reference(arch, batches):
    model = make_tiny(arch)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
    losses, norms = train(model, opt, torch_clip(model), batches, 1)
    grads = None
    return losses, norms, model.state_dict(), grads


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", MODES)
def test_modes_bitwise_equal_to_torch(arch, mode, tmp_path, engines):
    """Dropout is on in GPT-2 (same seed): recomputation must replay the same masks."""
    batches = make_batches(STEPS)
    ref_losses, ref_norms, ref_sd, _ = _reference(arch, batches)
    model = make_tiny(arch)
    model.train()
    engine = tierflow.offload(model, nvme=tmp_path, activations=mode, host_memory="16MiB",
                              device_memory="2MiB" if mode == "auto" else None, **SMALL_UNITS)
    engines.append(engine)
    opt = tierflow.AdamW(engine, lr=LR)
    losses, norms = train(engine, opt, opt.clip_grad_norm_, batches, 1)
    assert_bitwise(ref_losses, losses, "loss")
    assert_bitwise(ref_norms, norms, "grad norm")
    assert_state_bitwise(ref_sd, engine.state_dict())
    report = engine.activations.report()
    assert len(report["layers"]) == 2
    if mode in ("keep", "recompute", "offload"):
        assert set(report["layers"]) == {mode}
    if mode == "offload":
        assert engine.io_stats()["device_to_host"] > 0
    assert engine.budgets["device"].used == engine.plan.tier_bytes["device"] + _buffer_bytes(model) \
        + _cached(engine), "every activation's bytes must be released after backward"


def _buffer_bytes(model):
    return sum(b.numel() * b.element_size() for b in model.buffers())


def _cached(engine):
    from tierflow.plan import working_bytes
    return sum(working_bytes(engine.units[u], engine.compute_dtype) for u, r in enumerate(engine.residency)
               if r.flat is not None and not engine._is_permanent(u))


def test_bad_mode_is_rejected():
    with pytest.raises(ConfigError, match="activations"):
        tierflow.offload(make_tiny("llama"), activations="sometimes")


def test_policy_keeps_last_layers_and_offloads_or_recomputes_the_rest():
    stats = [LayerStats(saved_bytes=100, input_bytes=10, seconds=1.0) for _ in range(4)]
    outside = LayerStats(saved_bytes=20)
    assert set(choose(stats, outside, 1000, 1e9, 1e9).layers) == {"keep"}
    policy = choose(stats, outside, 200 + 20 + 100, 1e9, 1e9)  # transient 200 + outside + one layer
    assert policy.layers == ("offload", "offload", "offload", "keep")
    slow_copy = choose(stats, outside, 200 + 20 + 100, 1e9, 10.0)
    assert slow_copy.layers[:3] == ("recompute",) * 3
    no_host = choose(stats, outside, 200 + 20 + 100, 0, 1e9)
    assert no_host.layers[0] == "recompute"
