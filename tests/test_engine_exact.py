"""Exactness against plain PyTorch: same seed, fp32, CPU.

Every run: 6 optimizer steps of gradient accumulation 2 with global-norm clipping at 1.0
and lr 1e-2 (large enough that the updates matter). Losses, the grad norms returned by
clipping, the final weights and the Adam moments must be bitwise equal to
torch.optim.AdamW + torch.nn.utils.clip_grad_norm_ where the arithmetic is the same
(tierflow.AdamW(fused=True) vs torch.optim.AdamW(fused=True), tierflow.AdamW(fused=False)
vs torch's default AdamW), and within rtol 1e-6 where it is not.
"""
from __future__ import annotations

import pytest
import torch

import tierflow

from conftest import (MIX_BUDGETS, SMALL_UNITS, assert_bitwise, assert_state_bitwise, make_batches,
                      make_tiny, torch_clip, train)

STEPS, ACCUM, LR, WD = 6, 2, 1e-2, 0.01
# "host-streamed": host homes copied into device buffers at each use, as on a GPU (on a CPU
# they are otherwise computed in place: OffloadConfig.host_in_place).
PLACEMENTS = ["device", "host", "host-streamed", "nvme", "auto"]


def offload(model, placement, tmp_path, engines, **extra):
    """Small units everywhere; for "auto", budgets that force a device/host/NVMe mix."""
    if placement == "host-streamed":
        placement, extra = "host", dict(extra, host_in_place=False)
    kwargs = dict(SMALL_UNITS, placement=placement, nvme=tmp_path / "spill")
    if placement == "auto":
        kwargs.update(MIX_BUDGETS)
    kwargs.update(extra)
    engine = tierflow.offload(model, **kwargs)
    engines.append(engine)
    assert len(engine.units) > 5, "small units must split the model into many units"
    homes = set(engine.plan.homes)
    if placement == "auto":
        assert homes == {"device", "host", "nvme"}, f"budgets must force a 3-tier mix, got {engine.plan.homes}"
    else:
        assert homes == {placement}, engine.plan.homes
    return engine


def moments_of(opt, model):
    """name -> (step, exp_avg, exp_avg_sq) of a torch optimizer."""
    out = {}
    for name, param in model.named_parameters():
        state = opt.state.get(param)
        if state:
            out[name] = (int(state["step"]), state["exp_avg"], state["exp_avg_sq"])
    return out


def assert_moments_equal(ref_moments, engine):
    got = engine.optimizer_state()
    assert set(got) == set(ref_moments), set(got) ^ set(ref_moments)
    for name, (step, exp_avg, exp_avg_sq) in ref_moments.items():
        assert got[name]["step"] == step, name
        assert torch.equal(got[name]["exp_avg"], exp_avg), f"exp_avg of {name}"
        assert torch.equal(got[name]["exp_avg_sq"], exp_avg_sq), f"exp_avg_sq of {name}"


_REFERENCE: dict = {}


def reference(arch, fused=True, batches=None):
    """Plain-PyTorch run (cached per arch and optimizer flavour)."""
    key = (arch, fused)
    if key not in _REFERENCE:
        model = make_tiny(arch)
        kwargs = dict(lr=LR, weight_decay=WD) | ({"fused": True} if fused else {})
        opt = torch.optim.AdamW(model.parameters(), **kwargs)
        losses, norms = train(model, opt, torch_clip(model), batches or make_batches(STEPS * ACCUM), ACCUM)
        _REFERENCE[key] = (losses, norms, model.state_dict(), moments_of(opt, model))
    return _REFERENCE[key]


def assert_trains_like_torch(engine, arch, fused=True):
    """Train `engine` as the reference trains; losses, grad norms, weights and moments must be
    bitwise equal to plain PyTorch's. Returns the reference's grad norms."""
    ref_losses, ref_norms, ref_sd, ref_moments = reference(arch, fused=fused)
    opt = tierflow.AdamW(engine, lr=LR, weight_decay=WD, fused=fused)
    losses, norms = train(engine, opt, opt.clip_grad_norm_, make_batches(STEPS * ACCUM), ACCUM)
    assert_bitwise(ref_losses, losses, "loss")
    assert_bitwise(ref_norms, norms, "grad norm")
    assert_state_bitwise(ref_sd, engine.state_dict())
    assert_moments_equal(ref_moments, engine)
    return ref_norms


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fused_adamw_bitwise_equal_to_torch(arch, placement, tmp_path, engines):
    engine = offload(make_tiny(arch), placement, tmp_path, engines)
    ref_norms = assert_trains_like_torch(engine, arch, fused=True)
    assert any(n > 1.0 for n in ref_norms), "clipping at 1.0 must actually clip"
    ref_sd = reference(arch, fused=True)[2]
    assert not torch.equal(ref_sd[next(iter(ref_sd))], make_tiny(arch).state_dict()[next(iter(ref_sd))])
    if placement not in ("device", "host"):
        assert engine.io_stats()["host_to_device"] > 0, "weights must really stream to the device"
    if placement == "host":  # computed in place: nothing is copied
        assert engine.io_stats()["host_to_device"] == 0 and all(engine.plan.in_place)
    if placement in ("nvme", "auto"):
        assert engine.io_stats()["nvme_read"] > 0 and engine.io_stats()["nvme_written"] > 0


@pytest.mark.parametrize("arch,placement", [("gpt2", "nvme"), ("llama", "auto")])
def test_unfused_adamw_bitwise_equal_to_torch_default(arch, placement, tmp_path, engines):
    """tierflow.AdamW(fused=False) vs torch.optim.AdamW() with torch's default implementation."""
    assert_trains_like_torch(offload(make_tiny(arch), placement, tmp_path, engines), arch, fused=False)


def test_fused_default_close_to_torch_default_adamw(tmp_path, engines):
    """tierflow's default (fused kernel) vs torch's default AdamW: different arithmetic, so
    not bitwise; everything must agree within rtol 1e-6 (atol 1e-6 for values near 0)."""
    ref_losses, ref_norms, ref_sd, _ = reference("llama", fused=False)
    model = make_tiny("llama")
    engine = offload(model, "auto", tmp_path, engines)
    opt = tierflow.AdamW(engine, lr=LR, weight_decay=WD)  # default: fused=True
    assert opt.param_groups[0]["fused"] is True
    losses, norms = train(engine, opt, opt.clip_grad_norm_, make_batches(STEPS * ACCUM), ACCUM)
    tol = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), **tol)
    torch.testing.assert_close(torch.stack(norms), torch.stack(ref_norms), **tol)
    sd = engine.state_dict()
    assert set(sd) == set(ref_sd)
    for key in ref_sd:
        torch.testing.assert_close(sd[key], ref_sd[key], **tol, msg=lambda m, k=key: f"{k}: {m}")


def warmup(step):
    return min(1.0, (step + 1) / 4) * (0.5 if step >= 4 else 1.0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lr_scheduler_bitwise_equal_to_torch(arch, tmp_path, engines):
    """A LambdaLR warmup (then a drop) on tierflow.AdamW equals the same schedule on torch."""
    batches = make_batches(STEPS * ACCUM)
    ref = make_tiny(arch)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=WD, fused=True)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, warmup)
    ref_losses, ref_norms = train(ref, ref_opt, torch_clip(ref), batches, ACCUM, sched=ref_sched)

    model = make_tiny(arch)
    engine = offload(model, "auto", tmp_path, engines)
    opt = tierflow.AdamW(engine, lr=LR, weight_decay=WD)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup)
    lrs = []
    losses, norms = train(engine, opt, opt.clip_grad_norm_, batches, ACCUM, sched=sched,
                          before_step=lambda s: lrs.append(opt.param_groups[0]["lr"]))
    assert len(set(lrs)) >= 4, f"the schedule must change the lr: {lrs}"
    assert_bitwise(ref_losses, losses, "loss")
    assert_bitwise(ref_norms, norms, "grad norm")
    assert_state_bitwise(ref.state_dict(), engine.state_dict())


def no_decay_groups(model):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    assert decay and no_decay
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0, "lr": LR / 2}]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_param_groups_bitwise_equal_to_torch(arch, tmp_path, engines):
    """Weight decay 0 (and half the lr) for biases and norms, as param groups."""
    batches = make_batches(STEPS * ACCUM)
    ref = make_tiny(arch)
    ref_opt = torch.optim.AdamW(no_decay_groups(ref), lr=LR, fused=True)
    ref_losses, ref_norms = train(ref, ref_opt, torch_clip(ref), batches, ACCUM)

    model = make_tiny(arch)
    engine = offload(model, "auto", tmp_path, engines)
    opt = tierflow.AdamW(engine, params=no_decay_groups(model), lr=LR)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    losses, norms = train(engine, opt, opt.clip_grad_norm_, batches, ACCUM)
    assert_bitwise(ref_losses, losses, "loss")
    assert_bitwise(ref_norms, norms, "grad norm")
    assert_state_bitwise(ref.state_dict(), engine.state_dict())
    assert_moments_equal(moments_of(ref_opt, ref), engine)


@pytest.mark.parametrize("placement", ["nvme", "auto"])
def test_parameters_larger_than_a_staging_chunk(placement, tmp_path, engines):
    """GPT-2 with n_embd 64: c_attn (12288 elements) and c_fc (16384) are larger than one
    32 KiB staging chunk (8192 fp32), so their gradients are accumulated and their norms
    computed window by window; the result must still equal torch bitwise."""
    import transformers

    def wide():
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=64, n_layer=1, n_head=2,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.AutoModelForCausalLM.from_config(cfg)

    batches = make_batches(STEPS * ACCUM)
    ref = wide()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=WD, fused=True)
    ref_losses, ref_norms = train(ref, ref_opt, torch_clip(ref), batches, ACCUM)

    model = wide()
    assert max(p.numel() for p in model.parameters()) > 32 * 1024 // 4
    kwargs = dict(SMALL_UNITS, placement=placement, nvme=tmp_path / "spill")
    if placement == "auto":
        kwargs.update(device_memory="400KiB", host_memory="1MiB")
    engine = tierflow.offload(model, **kwargs)
    engines.append(engine)
    assert "nvme" in engine.plan.homes
    opt = tierflow.AdamW(engine, lr=LR, weight_decay=WD)
    losses, norms = train(engine, opt, opt.clip_grad_norm_, batches, ACCUM)
    assert_bitwise(ref_losses, losses, "loss")
    assert_bitwise(ref_norms, norms, "grad norm")
    assert_state_bitwise(ref.state_dict(), engine.state_dict())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_spread_plan_bitwise_equal_to_torch(arch, tmp_path, engines):
    """A planner variant whose homes interleave the tiers (not nearest-first in model order),
    with half the device room left to cache streamed weights and a wider prefetch window."""
    engine = tierflow.offload(make_tiny(arch), placement=tierflow.Variant("spread", 0.5, 2.0),
                              nvme=tmp_path / "spill", **SMALL_UNITS, **MIX_BUDGETS)
    engines.append(engine)
    homes = list(engine.plan.homes)
    assert {"host", "nvme"} <= set(homes), homes
    order = {"device": 0, "host": 1, "nvme": 2}
    assert homes != sorted(homes, key=order.get), f"tiers must interleave: {homes}"
    assert_trains_like_torch(engine, arch, fused=True)
