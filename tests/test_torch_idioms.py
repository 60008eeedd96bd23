"""Torch idioms over an engine's parameters never silently do nothing (runtime/torch_idioms.py):
`torch.nn.utils.clip_grad_norm_` returns torch's exact norm and clips exactly as plain PyTorch
does; what cannot work (values of a held gradient, a clip over a subset, a torch optimizer over
the engine's parameters) raises `tierflow.UnsupportedError` saying what to use instead."""
from __future__ import annotations

import pytest
import torch

import tierflow

from conftest import (MIX_BUDGETS, SMALL_UNITS, assert_bitwise, assert_state_bitwise, lm_batch, make_batches,
                      make_tiny, torch_clip, train)

LR = 1e-2


def offloaded(arch, tmp_path, engines, **kw):
    model = make_tiny(arch)
    engine = tierflow.offload(model, nvme=tmp_path / "spill", **{**SMALL_UNITS, **MIX_BUDGETS, **kw})
    engines.append(engine)
    return model, engine, tierflow.AdamW(engine, lr=LR)


def reference(arch, batches, accum, clip=True):
    ref = make_tiny(arch)
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, fused=True)
    losses, norms = train(ref, opt, torch_clip(ref) if clip else None, batches, accum)
    return ref, losses, norms


def torch_clip_of(how, engine):
    def clip(max_norm):
        params = engine.parameters() if how != "module" else engine.module.parameters()
        if how == "split":  # the two halves torch's clip_grad_norm_ is made of
            params = list(params)
            total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
            return total
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True if how == "foreach" else None)
    return clip


@pytest.mark.parametrize("arch,how", [("llama", "engine"), ("llama", "module"), ("gpt2", "foreach"),
                                      ("llama", "split")])
def test_torch_clip_grad_norm_is_exact(arch, how, tmp_path, engines):
    """Mixed device / host / NVMe homes, 2 micro-batches: norms, losses and state bitwise."""
    batches = make_batches(6)
    ref, ref_losses, ref_norms = reference(arch, batches, 2)
    model, engine, opt = offloaded(arch, tmp_path, engines)
    assert {"host", "nvme"} <= {tier for tier, classes in engine.placement().items() if classes.get("master")}
    losses, norms = train(engine, opt, torch_clip_of(how, engine), batches, 2)
    assert_bitwise(ref_norms, norms, "grad norms")
    assert max(n.item() for n in norms) > 1.0, "the clip must bite for the test to mean something"
    assert_bitwise(ref_losses, losses, "losses")
    assert_state_bitwise(ref.state_dict(), engine.state_dict())


def test_param_grad_shows_the_held_gradient(tmp_path, engines):
    model, engine, opt = offloaded("llama", tmp_path, engines)
    weight = model.model.layers[0].mlp.up_proj.weight
    assert weight.grad is None
    engine(**lm_batch(make_batches(1)[0])).loss.backward()
    grad = weight.grad
    assert type(grad).__name__ == "TieredGradient" and isinstance(weight, torch.nn.Parameter)
    assert grad.shape == weight.shape and grad.dtype == weight.dtype and grad.device == weight.device
    norm = torch.linalg.vector_norm(grad)
    unit, slot = next((u, s) for u, s in engine.named_slots() if s.param is weight)
    assert torch.equal(norm, torch.linalg.vector_norm(engine.read_array(unit, slot, "grad")))
    for misuse in (lambda: grad.sum(), lambda: grad + 1, lambda: grad.cpu(), lambda: grad.norm(p=1),
                   lambda: torch.nn.utils.clip_grad_value_(engine.parameters(), 0.1)):
        with pytest.raises(tierflow.UnsupportedError, match="opt.clip_grad_norm_"):
            misuse()
    opt.step()
    opt.zero_grad()
    assert weight.grad is None  # the step consumed it
    engine.close()
    assert type(weight) is torch.nn.Parameter  # given back as it was


def test_torch_clip_over_a_subset_raises_and_steps_nothing(tmp_path, engines):
    model, engine, opt = offloaded("llama", tmp_path, engines)
    before = engine.state_dict()
    engine(**lm_batch(make_batches(1)[0])).loss.backward()
    with pytest.raises(tierflow.UnsupportedError, match="opt.clip_grad_norm_"):
        torch.nn.utils.clip_grad_norm_(model.lm_head.parameters(), 1e-3)
    opt.zero_grad()
    assert_state_bitwise(before, engine.state_dict())
    # Scaling a subset without asking for norms first is caught at the step, before it changes anything.
    engine(**lm_batch(make_batches(1)[0])).loss.backward()
    model.lm_head.weight.grad.mul_(0.5)
    with pytest.raises(tierflow.UnsupportedError, match="opt.clip_grad_norm_"):
        opt.step()
    opt.zero_grad()
    assert_state_bitwise(before, engine.state_dict())


def test_model_zero_grad_drops_gradients_as_torch_does(tmp_path, engines):
    """backward, model.zero_grad() (set_to_none both ways), backward, step: only the second
    backward's gradients are stepped, as in plain PyTorch."""
    batches = make_batches(4)

    def run(module, opt, zero):
        losses = []
        for step in range(2):
            for ids in batches[2 * step:2 * step + 2]:
                zero()  # drops the previous micro-batch's gradient
                loss = module(**lm_batch(ids)).loss
                loss.backward()
                losses.append(loss.detach())
            opt.step()
            opt.zero_grad()
        return losses

    ref = make_tiny("llama")
    ref_losses = run(ref, torch.optim.AdamW(ref.parameters(), lr=LR, fused=True), ref.zero_grad)
    for set_to_none in (True, False):
        model, engine, opt = offloaded("llama", tmp_path / str(set_to_none), engines)
        losses = run(engine, opt, lambda: model.zero_grad(set_to_none=set_to_none))
        assert_bitwise(ref_losses, losses, "losses")
        assert_state_bitwise(ref.state_dict(), engine.state_dict())


@pytest.mark.parametrize("make", [lambda e: torch.optim.AdamW(e.parameters(), lr=LR),
                                  lambda e: torch.optim.SGD(e.module.parameters(), lr=LR)],
                         ids=["AdamW", "SGD"])
def test_torch_optimizer_over_engine_parameters_raises_at_its_first_step(make, tmp_path, engines):
    model = make_tiny("llama")
    engine = tierflow.offload(model, nvme=tmp_path / "spill", **SMALL_UNITS, **MIX_BUDGETS)
    engines.append(engine)
    opt = make(engine)
    before = engine.state_dict()
    engine(**lm_batch(make_batches(1)[0])).loss.backward()
    with pytest.raises(tierflow.UnsupportedError, match=r"tierflow\.AdamW"):
        opt.step()
    assert_state_bitwise(before, engine.state_dict())
    # A torch optimizer over parameters of no engine is untouched while an engine lives.
    other = torch.nn.Linear(4, 4)
    other_opt = torch.optim.SGD(other.parameters(), lr=1.0)
    other(torch.ones(1, 4)).sum().backward()
    old = other.weight.detach().clone()
    other_opt.step()
    assert not torch.equal(old, other.weight)
    engine.close()
    opt.step()  # the engine is gone: plain torch again (no gradients: nothing happens)


def test_two_engines_over_one_model_give_the_parameters_back(engines):
    model = make_tiny("llama")
    first = tierflow.offload(model, **SMALL_UNITS)
    second = tierflow.offload(model, **SMALL_UNITS)
    engines += [first, second]
    first.close()
    second(**lm_batch(make_batches(1)[0])).loss.backward()
    assert type(model.lm_head.weight.grad).__name__ == "TieredGradient"  # still the second engine's
    second.close()
    assert type(model.lm_head.weight) is torch.nn.Parameter and model.lm_head.weight.grad is None
