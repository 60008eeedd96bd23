"""PEFT LoRA through tierflow: adapters train while the frozen base streams from host memory
or NVMe in the compute dtype; losses and adapters equal plain PEFT training bit for bit (CPU,
fp32); with a bf16 compute dtype within a stated tolerance; adapters saved with PEFT's
`save_pretrained` (via tierflow.integrations.peft.save_adapters) reload into a fresh model
that gives the same outputs."""
from __future__ import annotations

import pytest
import torch

import tierflow

from conftest import SMALL_UNITS, assert_bitwise, lm_batch, make_batches, make_tiny, torch_clip, train

peft = pytest.importorskip("peft")
from tierflow.integrations.peft import adapter_state_dict, save_adapters  # noqa: E402

LR = 1e-2


def lora_model(seed=0):
    torch.manual_seed(11)  # LoRA's A matrices are drawn at random
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return peft.get_peft_model(make_tiny("llama", seed), config)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def plain_run(batches, accum=2):
    ref = lora_model()
    opt = torch.optim.AdamW(trainable(ref), lr=LR, fused=True)
    losses, norms = train(ref, opt, torch_clip(ref), batches, accum)
    return ref, losses, norms


def tiered_run(placement, tmp_path, engines, batches, accum=2, **kw):
    model = lora_model()
    engine = tierflow.offload(model, nvme=tmp_path / "spill", placement=placement, **SMALL_UNITS, **kw)
    engines.append(engine)
    opt = tierflow.AdamW(engine, lr=LR)
    losses, norms = train(engine, opt, opt.clip_grad_norm_, batches, accum)
    return model, engine, losses, norms


def check_frozen_base_keeps_only_weights(engine, placement):
    """Units without a trainable parameter hold only compute-dtype weights (no fp32 master,
    gradient or moments); units with LoRA parameters hold gradients and moments only for them."""
    frozen = 0
    for unit, state in zip(engine.units, engine.states):
        assert state.home == placement
        trainable_numel = sum(s.numel for s in unit.slots if s.trainable)
        if not trainable_numel:
            frozen += 1
            (name,) = state.arrays  # one array: the weights
            assert state.dtypes[name] == engine.compute_dtype, (unit.name, state.dtypes)
        else:
            assert all("lora_" in s.name for s in unit.slots if s.trainable)
            # the LoRA parameters come first in the unit: gradients and moments end before the base
            end = max(s.offset + s.numel for s in unit.slots if s.trainable)
            assert end <= unit.trainable_numel <= min(s.offset for s in unit.slots if not s.trainable)
            for name in ("grad", "exp_avg", "exp_avg_sq"):
                assert state.nbytes(name) == 4 * unit.trainable_numel, (unit.name, name)
    assert frozen > len(engine.units) // 2
    table = engine.placement()[placement]
    assert table["moments"] == 2 * table["grads"] == 2 * 4 * sum(u.trainable_numel for u in engine.units)


@pytest.mark.parametrize("placement", ["host", "nvme"])
def test_lora_trains_bitwise_like_plain_peft(placement, tmp_path, engines):
    batches = make_batches(6)
    ref, ref_losses, ref_norms = plain_run(batches)
    model, engine, losses, norms = tiered_run(placement, tmp_path, engines, batches)
    check_frozen_base_keeps_only_weights(engine, placement)
    assert_bitwise(ref_losses, losses, "losses")
    assert_bitwise(ref_norms, norms, "grad norms")
    ref_adapters = peft.get_peft_model_state_dict(ref)
    got = adapter_state_dict(engine)
    assert ref_adapters and all("lora_" in k for k in ref_adapters)
    assert_bitwise([ref.state_dict()[k] for k in sorted(got)], [got[k] for k in sorted(got)], "adapters")
    assert len(got) == len(ref_adapters)
    start = lora_model().state_dict()
    assert all(not torch.equal(start[k], got[k]) for k in got if "lora_B" in k), "adapters must train"
    frozen = [k for k in start if "lora_" not in k]
    full = engine.state_dict()
    assert all(torch.equal(start[k], full[k]) for k in frozen), "the base must stay frozen"


def test_lora_bf16_compute_close_to_fp32_peft(tmp_path, engines):
    """bf16 weights on the device (the frozen base kept in bf16 only), fp32 masters and moments
    for the adapters, against fp32 plain PEFT over 3 steps: every loss within 0.1% (measured:
    0.02%); the adapters' total change from their init within 30% relative L2 distance of
    fp32's (measured: about 12%; AdamW's normalised steps amplify bf16 noise in small
    gradients, lora_A most)."""
    batches = make_batches(6)
    ref, ref_losses, _ = plain_run(batches)
    model, engine, losses, _ = tiered_run("nvme", tmp_path, engines, batches, dtype=torch.bfloat16)
    check_frozen_base_keeps_only_weights(engine, "nvme")
    assert engine.compute_dtype == torch.bfloat16
    torch.testing.assert_close(torch.stack(losses).float(), torch.stack(ref_losses), rtol=1e-3, atol=0)
    got, want, start = adapter_state_dict(engine), ref.state_dict(), lora_model().state_dict()
    moved = torch.cat([(got[k].float() - start[k]).reshape(-1) for k in sorted(got)])
    ref_moved = torch.cat([(want[k] - start[k]).reshape(-1) for k in sorted(got)])
    assert (moved - ref_moved).norm() < 0.3 * ref_moved.norm()


def test_saved_adapters_reload_into_a_fresh_model(tmp_path, engines):
    batches = make_batches(4)
    ref, _, _ = plain_run(batches)
    model, engine, _, _ = tiered_run("nvme", tmp_path, engines, batches)
    out = tmp_path / "adapter"
    save_adapters(engine, out)
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    from safetensors.torch import load_file

    saved = load_file(out / "adapter_model.safetensors")
    expected = peft.get_peft_model_state_dict(ref)
    assert set(saved) == set(expected)
    assert_bitwise([expected[k] for k in sorted(saved)], [saved[k] for k in sorted(saved)], "saved adapters")

    fresh = peft.PeftModel.from_pretrained(make_tiny("llama"), out).eval()
    ref.eval()
    engine.eval()
    ids = make_batches(1, seed=5)[0]
    with torch.no_grad():
        want = ref(**lm_batch(ids)).logits
        assert torch.equal(fresh(**lm_batch(ids)).logits, want)
        assert torch.equal(engine(**lm_batch(ids)).logits, want)
