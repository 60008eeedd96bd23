"""Gradients of a 2-byte compute dtype kept in it off the device (gradients.py, "packed").

Widening bf16 to fp32 is exact, so a packed gradient must change nothing: the same losses,
norms, weights and moments to the last bit as the same run with fp32 gradient arrays, with
one micro-batch per step (kept packed) and two (widened in place when the second arrives),
in host memory and on NVMe. What it saves is bytes: 2 B per parameter each way.
"""
import pytest
import torch

import tierflow
from conftest import SMALL_UNITS, assert_bitwise, assert_state_bitwise, make_batches, make_tiny, train

LR, WD = 1e-3, 0.01


def run(tmp_path, engines, placement: str, accum: int, packs: bool, steps: int = 3):
    model = make_tiny("llama")
    kw = dict(nvme=tmp_path / f"spill-{packs}") if placement == "nvme" else {}
    engine = tierflow.offload(model, **SMALL_UNITS, **kw, placement=placement, dtype=torch.bfloat16,
                              host_in_place=False)
    engines.append(engine)
    engine.grads.packs = packs
    opt = tierflow.AdamW(engine, lr=LR, weight_decay=WD)
    forms = []  # before each step: the form the previous step's gradients had (none before the first)

    def before_step(step):
        forms.append(dict(engine.grads.forms))

    losses, norms = train(engine, opt, opt.clip_grad_norm_, make_batches(steps * accum), accum,
                          before_step=before_step)
    engine.step_forms = forms
    return engine, losses, norms


@pytest.mark.parametrize("placement", ["host", "nvme"])
@pytest.mark.parametrize("accum", [1, 2])
def test_packed_gradients_change_nothing(tmp_path, engines, placement, accum):
    plain, plain_losses, plain_norms = run(tmp_path, engines, placement, accum, packs=False)
    packed, losses, norms = run(tmp_path, engines, placement, accum, packs=True)
    assert_bitwise(plain_losses, losses, "losses")
    assert_bitwise(plain_norms, norms, "grad norms")
    assert_state_bitwise(plain.state_dict(), packed.state_dict())
    ref_opt, got_opt = plain.optimizer_state(), packed.optimizer_state()
    assert set(ref_opt) == set(got_opt)
    for name in ref_opt:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ref_opt[name][key], got_opt[name][key]), (name, key)
    trainable = [u.uid for u in packed.units if u.trainable_numel]
    assert len(packed.step_forms) == 3 and not any(plain.step_forms)
    assert packed.step_forms[0] == {}
    for forms in packed.step_forms[1:]:  # every step's gradients reached AdamW packed (one micro-batch)
        assert forms == ({uid: torch.bfloat16 for uid in trainable} if accum == 1 else {}), forms
    if accum == 1:  # the last step's gradients are still in their arrays, packed
        assert set(packed.grads.forms) == set(trainable)
        assert set(packed.grads.forms.values()) == {torch.bfloat16}
    else:  # widened by the first second micro-batch, and never packed since
        assert not packed.grads.forms
    assert not plain.grads.forms
    if placement == "nvme":
        # Fewer bytes both ways with one micro-batch (on this tiny model most parameters are
        # smaller than the 4 KiB a disk request is rounded to: about 2 B less per parameter
        # over the run, on a real model 2 B less per parameter each way and step).
        saved_write = plain.io_stats()["nvme_written"] - packed.io_stats()["nvme_written"]
        saved_read = plain.io_stats()["nvme_read"] - packed.io_stats()["nvme_read"]
        if accum == 1:
            assert saved_write > 0 and saved_read > 0, (saved_write, saved_read)
        else:  # the first step's, written packed, then widened: micro-batches turn packing off
            assert saved_write < 0, saved_write
    if accum == 2:
        assert packed.grads.accumulates and not plain.grads.accumulates


def test_read_array_widens_a_packed_gradient(tmp_path, engines):
    values = []
    for packs in (False, True):
        model = make_tiny("llama")
        engine = tierflow.offload(model, **SMALL_UNITS, placement="nvme", nvme=tmp_path / f"s{packs}",
                                  dtype=torch.bfloat16)
        engines.append(engine)
        engine.grads.packs = packs
        ids = make_batches(1)[0]
        engine(input_ids=ids, labels=ids).loss.backward()  # (read_array waits for the drain)
        unit, slot = next((u, s) for u, s in engine.named_slots() if s.name.endswith("up_proj.weight"))
        values.append(engine.read_array(unit, slot, "grad"))
        assert (unit.uid in engine.grads.forms) == packs
    assert values[0].dtype == values[1].dtype == torch.float32
    assert torch.equal(values[0], values[1])
    assert values[0].abs().sum() > 0
