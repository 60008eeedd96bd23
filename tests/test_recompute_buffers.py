"""activations='recompute' runs a layer's forward again in backward: buffers that forward
updates in place (BatchNorm's running statistics and num_batches_tracked) must still be
updated once per forward, bit for bit as a plain model; and a model without layers to
recompute is refused before any work, saying what to change."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import tierflow
from tierflow.errors import ConfigError

from conftest import SMALL_UNITS, assert_bitwise, assert_state_bitwise

STEPS, LR = 6, 1e-2


class BNNet(nn.Module):
    def __init__(self, momentum=0.1):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 32)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32, momentum=momentum), nn.ReLU()) for _ in range(3))
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def _inputs():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(16, 8, generator=gen) for _ in range(STEPS)], torch.randn(16, 8, generator=gen)


def _run(module, opt, xs):
    losses = []
    for x in xs:
        loss = module(x).square().mean()
        loss.backward()
        losses.append(loss.detach().clone())
        opt.step()
        opt.zero_grad()
    return losses


@pytest.mark.parametrize("momentum", [0.1, None])  # None: the cumulative average
@pytest.mark.parametrize("mode", ["recompute", "keep", "offload"])
def test_batchnorm_running_stats_bitwise_equal_to_a_plain_model(mode, momentum, tmp_path, engines):
    xs, probe = _inputs()
    ref = BNNet(momentum)
    ref_losses = _run(ref, torch.optim.AdamW(ref.parameters(), lr=LR, fused=True), xs)
    model = BNNet(momentum)
    engine = tierflow.offload(model, nvme=tmp_path, activations=mode, **SMALL_UNITS)
    engines.append(engine)
    assert len(engine.activations.report()["layers"]) == 3
    losses = _run(engine, tierflow.AdamW(engine, lr=LR), xs)
    assert_bitwise(ref_losses, losses, "loss")
    state = engine.state_dict()
    for i in range(3):
        assert int(state[f"blocks.{i}.1.num_batches_tracked"]) == STEPS
    assert_state_bitwise(ref.state_dict(), state)
    ref.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(engine(probe), ref(probe)), "eval output uses the running statistics"


def test_recompute_with_batchnorm_in_eval_mode_trains_like_a_plain_model(tmp_path, engines):
    """In eval mode BatchNorm saves its running statistics for backward and changes nothing:
    the recomputation must leave them untouched (no in-place write autograd would refuse)."""
    xs, _ = _inputs()
    ref = BNNet().eval()
    ref_losses = _run(ref, torch.optim.AdamW(ref.parameters(), lr=LR, fused=True), xs)
    model = BNNet().eval()
    engine = tierflow.offload(model, nvme=tmp_path, activations="recompute", **SMALL_UNITS)
    engines.append(engine)
    losses = _run(engine, tierflow.AdamW(engine, lr=LR), xs)
    assert_bitwise(ref_losses, losses, "loss")
    assert_state_bitwise(ref.state_dict(), engine.state_dict())


def test_recompute_without_a_module_list_is_refused_before_any_work():
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as info:
        tierflow.offload(model, activations="recompute")
    message = str(info.value)
    assert "nn.ModuleList" in message and "Sequential" in message and "activations='offload'" in message, message
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules()), "hooks left behind"
    engine = tierflow.offload(model, activations="offload")  # the other modes still work (outside the layers)
    engine.close()
