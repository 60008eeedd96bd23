"""An activation budget that `offload()` accepts never fails in the middle of a step.

The case: a 3-layer GPT-2 (n_embd 64, dropout on) on batches of 2x96 saves ~1.9 MB per layer.
At device_memory 2 or 4 MiB, offloaded activations fetched back ahead of backward used to
fill the device budget; the weights backward needed next then waited for memory that only
backward's own progress could free, and the step failed after the 120 s budget wait. The
read-ahead now stays within the room the plan leaves for activations, and a tensor that
cannot come back at all fails at once, in forward, saying what is short."""
from __future__ import annotations

import warnings

import pytest
import torch

import tierflow
from tierflow.errors import BudgetError

BUDGETS = dict(host_memory="4MiB")


def _gpt2():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=96, n_positions=128, n_embd=64, n_layer=3, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.train()  # dropout on: recomputation must replay the same masks
    return model


def _batch(batch=2, seq=96):
    return torch.randint(0, 96, (batch, seq), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def short_budget_wait(monkeypatch):
    """A stall used to cost the 120 s budget wait before it failed: with 10 s a regression fails
    fast. (Waits for copies in flight, which free memory on their own, take milliseconds; nothing
    asserted depends on the clock.)"""
    import tierflow.runtime.activations
    import tierflow.runtime.residency

    monkeypatch.setattr(tierflow.runtime.residency, "BUDGET_WAIT_S", 10.0)
    monkeypatch.setattr(tierflow.runtime.activations, "BUDGET_WAIT_S", 10.0)


@pytest.mark.parametrize("mode", ["offload", "auto"])
@pytest.mark.parametrize("device_memory", ["2MiB", "4MiB", "8MiB"])
def test_accepted_budget_trains_within_it(mode, device_memory, tmp_path, engines, short_budget_wait):
    ids = _batch()
    engine = tierflow.offload(_gpt2(), device_memory=device_memory, nvme=tmp_path, activations=mode, **BUDGETS)
    engines.append(engine)
    opt = tierflow.AdamW(engine, lr=1e-3)
    losses = []
    for _ in range(3):  # auto: step 1 offloads everything (measuring), then its own policy
        loss = engine(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    for tier, (peak, capacity) in engine.budget_peaks().items():
        assert peak <= capacity, f"{tier} peak {peak} over its budget {capacity}"
    saved = engine.activations.report()["saved_bytes"]
    assert sum(saved) > engine.budgets["device"].capacity / 2, "activations must not fit alongside the state"


@pytest.mark.parametrize("mode", ["offload", "auto"])
def test_activation_too_big_to_come_back_fails_at_once_in_forward(mode, tmp_path, engines, short_budget_wait):
    """Batch 8: one saved tensor is larger than the room 2 MiB leaves for activations. The error
    comes from forward (nothing waited for, no state changed) and says what is short."""
    ids = _batch(batch=8)
    model = _gpt2()
    engine = tierflow.offload(model, device_memory="2MiB", nvme=tmp_path, activations=mode, **BUDGETS)
    engines.append(engine)
    before = {k: v.clone() for k, v in engine.state_dict().items()}
    with pytest.raises(BudgetError) as info:
        engine(input_ids=ids, labels=ids)
    message = str(info.value)
    for words in ("saved for backward", "leaves for activations", "short", "raise device_memory", "smaller batch"):
        assert words in message, message
    after = engine.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a failed forward must not change the state"


def test_budget_rejected_up_front_leaves_the_model_as_it_was(tmp_path):
    model = _gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BudgetError, match="device_memory"):
        tierflow.offload(model, device_memory="64KiB", nvme=tmp_path, activations="offload", **BUDGETS)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a rejected offload"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "hooks left behind"
    ids = _batch()
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_default_activation_mode_keeps_a_gpu_budget_whole():
    """Unset, activations are managed ("auto") on a GPU given a device budget, so that budget
    bounds all of the engine's GPU memory; elsewhere, and with "autograd", autograd keeps them."""
    from tierflow.config import OffloadConfig, check_mode, default_activations

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert default_activations(None, gpu, 2**30) == "auto"
    assert default_activations(None, gpu, None) is None          # no budget to keep
    assert default_activations(None, cpu, 2**30) is None
    assert default_activations(check_mode("AutoGrad"), gpu, 2**30) is None
    assert default_activations(check_mode("offload"), cpu, None) == "offload"
    assert OffloadConfig.create(device="cpu", device_memory="1GiB").activations is None
    assert OffloadConfig.create(device="cpu", activations="autograd").activations is None
