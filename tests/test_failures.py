"""Failures never pass silently: non-finite gradients, failed jobs, clipping twice; and a
failure while a checkpoint or an export is put in place leaves the previous one whole.

CPU, fp32: where the arithmetic is torch's own the comparisons are bitwise.
"""
from __future__ import annotations

import copy
import errno
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import tierflow
from tierflow import CheckpointError, EngineFailedError, NonFiniteError, NvmeError
from tierflow.checkpoint import files as tf_files, verify

from conftest import SMALL_UNITS, assert_state_bitwise, make_batches, make_tiny

LR = 1e-2
PLACEMENTS = ["device", "host", "nvme"]


def _engine(model, placement, tmp_path, engines, **opt_kwargs):
    engine = tierflow.offload(model, placement=placement, nvme=tmp_path / "spill", **SMALL_UNITS)
    engines.append(engine)
    return engine, tierflow.AdamW(engine, lr=LR, **opt_kwargs)


def _step(module, opt, clip, ids, loss_factor=1.0):
    loss = module(input_ids=ids, labels=ids).loss * loss_factor
    loss.backward()
    clip(1.0)
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_nonfinite_gradients_skip_the_step_and_raise(tmp_path, engines, placement):
    """An inf loss gives non-finite gradients: that step changes nothing, and the next step
    (or save) raises NonFiniteError; the state and step counters are those of the step before."""
    engine, opt = _engine(make_tiny("llama"), placement, tmp_path, engines)
    b1, b2, b3 = make_batches(3)
    _step(engine, opt, opt.clip_grad_norm_, b1)
    good_state, good_steps = engine.state_dict(), engine.optimizer_steps
    _step(engine, opt, opt.clip_grad_norm_, b2, loss_factor=float("inf"))
    engine(input_ids=b3, labels=b3).loss.backward()
    with pytest.raises(NonFiniteError, match="not finite"):
        opt.step()
    assert engine.skipped_steps == 1
    assert engine.optimizer_steps == good_steps
    opt.zero_grad()
    assert_state_bitwise(good_state, engine.state_dict())


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_skip_nonfinite_trains_on_like_torch_without_the_bad_step(tmp_path, engines, placement):
    """AdamW(skip_nonfinite=True): the bad step is skipped (as torch.amp.GradScaler skips it),
    so training equals torch trained on the good batches only, bit for bit."""
    model = make_tiny("llama")
    ref = copy.deepcopy(model)
    engine, opt = _engine(model, placement, tmp_path, engines, skip_nonfinite=True)
    batches = make_batches(4)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, fused=True)
    ref_clip = lambda n: torch.nn.utils.clip_grad_norm_(ref.parameters(), n)
    for i, ids in enumerate(batches):
        if i != 1:
            _step(ref, ref_opt, ref_clip, ids)
    with pytest.warns(UserWarning, match="not finite"):
        for i, ids in enumerate(batches):
            _step(engine, opt, opt.clip_grad_norm_, ids, loss_factor=float("nan") if i == 1 else 1.0)
    assert engine.skipped_steps == 1
    assert set(engine.optimizer_steps.values()) == {3}
    assert_state_bitwise(ref.state_dict(), engine.state_dict())


def test_clipping_twice_gives_torchs_answer(tmp_path, engines):
    """The second clip sees the already clipped gradients: its norm is ~max_norm and the
    coefficient is not squared (it was: 6080, 6080 where torch returns 6080, 1.0)."""
    model = make_tiny("llama")
    ref = copy.deepcopy(model)
    engine = tierflow.offload(model, placement="host", **SMALL_UNITS)
    engines.append(engine)
    # eps=1: the update is ~linear in the gradient (|g| << 1 after clipping), so a wrong
    # coefficient shows in the weights, while last-bit differences stay last-bit (below).
    opt = tierflow.AdamW(engine, lr=LR, eps=1.0)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, eps=1.0, fused=True)
    for ids in make_batches(3):
        ref(input_ids=ids, labels=ids).loss.mul(100).backward()
        want = [torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0) for _ in range(2)]
        engine(input_ids=ids, labels=ids).loss.mul(100).backward()
        got = [opt.clip_grad_norm_(1.0) for _ in range(2)]
        assert want[0] > 10 and abs(want[1].item() - 1.0) < 1e-5
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        ref_opt.step(), ref_opt.zero_grad(), opt.step(), opt.zero_grad()
    # The second norm is norm(g) * c1 here and norm(g * c1) in torch, and torch multiplies the
    # gradients twice: each gradient differs by a few ulps (|g| <= 1), so each of the 3 updates
    # (lr * ~g with eps=1) by ~lr * 1e-7: within atol 1e-8. A squared coefficient is ~1e-4 off.
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(engine.state_dict()[key], value, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("fault", ["write", "read"])
def test_a_failed_update_job_fails_the_engine_and_keeps_the_last_checkpoint(tmp_path, engines, monkeypatch, fault):
    """EIO in the NVMe I/O of an update: the error surfaces, and from then on the engine refuses
    to train or save (the step is half applied); the last good checkpoint is untouched and
    still resumes; the failed job's device reservation is released."""
    model = make_tiny("llama")
    engine, opt = _engine(model, "nvme", tmp_path, engines)
    b1, b2, b3 = make_batches(3)
    _step(engine, opt, opt.clip_grad_norm_, b1)
    good = engine.save(tmp_path / "ckpt")
    saved = {p.name: p.read_bytes() for p in sorted(good.iterdir()) if p.is_file()}
    engine(input_ids=b2, labels=b2).loss.backward()
    real = os.pwritev if fault == "write" else os.preadv
    calls = {"n": 0}

    def failing(*args):
        calls["n"] += 1
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "pwritev" if fault == "write" else "preadv", failing)
    with pytest.raises((NvmeError, OSError)):
        opt.step()
        opt.zero_grad()
        engine(input_ids=b3, labels=b3)  # the updates run in the fetches of this forward
        engine.flush()
    monkeypatch.setattr(os, "pwritev" if fault == "write" else "preadv", real)
    assert calls["n"] > 0, "the fault was never injected"
    with pytest.raises(EngineFailedError, match="resume"):
        engine(input_ids=b3, labels=b3)
    with pytest.raises(EngineFailedError):
        opt.step()
    with pytest.raises(EngineFailedError), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (gradients of the failed step are pending)
        engine.save(tmp_path / "ckpt-after")
    assert not (tmp_path / "ckpt-after").exists()
    assert {p.name: p.read_bytes() for p in sorted(good.iterdir()) if p.is_file()} == saved
    resumed, _opt = tierflow.resume(tmp_path / "ckpt", make_tiny("llama"), nvme=tmp_path / "spill2")
    engines.append(resumed)
    assert set(resumed.optimizer_steps.values()) == {1}


def test_an_unusable_activation_spill_directory_fails_before_the_model_moves(tmp_path):
    """activations= with an NVMe directory that cannot be used, and budgets that put no state
    there: a clear NvmeError up front, the model untouched (it used to be left with NaN
    placeholders and hooks, the spill file being opened only after the state had moved)."""
    model = make_tiny("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(NvmeError):
        tierflow.offload(model, activations="offload", nvme=blocker / "spill", **SMALL_UNITS)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not model._forward_hooks and not model._forward_pre_hooks
    ids = make_batches(1)[0]
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("fault", [OSError(errno.EIO, "simulated I/O error"), KeyboardInterrupt()])
def test_replacing_a_checkpoint_without_the_exchange_keeps_the_old_one_when_the_second_rename_fails(
        tmp_path, engines, monkeypatch, fault):
    """Where renameat2's exchange is unavailable a checkpoint is replaced by two renames (old
    aside, new in): a failure or Ctrl-C between them puts the old one back under its name (it
    was left only as NAME.old-*, and the new one deleted); without a fault the new one lands."""
    engine, opt = _engine(make_tiny("llama"), "host", tmp_path, engines)
    b1, b2 = make_batches(2)
    _step(engine, opt, opt.clip_grad_norm_, b1)
    ckpt = engine.save(tmp_path / "ckpt", extra={"step": 1})
    saved = {p.name: p.read_bytes() for p in sorted(ckpt.iterdir())}
    _step(engine, opt, opt.clip_grad_norm_, b2)
    monkeypatch.setattr(tf_files, "exchange_dirs", lambda a, b: False)
    real, calls = os.rename, []

    def rename(src, dst, *args, **kwargs):
        calls.append((str(src), str(dst)))
        if str(dst) == str(ckpt) and ".tmp-" in str(src):  # the new one moving in: the second rename
            raise fault
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(CheckpointError if isinstance(fault, OSError) else KeyboardInterrupt):
        engine.save(tmp_path / "ckpt", extra={"step": 2})
    monkeypatch.setattr(os, "rename", real)
    assert any(".old-" in dst for _, dst in calls), "the fallback path was not taken"
    assert {p.name: p.read_bytes() for p in sorted(ckpt.iterdir())} == saved
    assert [p.name for p in tmp_path.glob("ckpt*")] == ["ckpt"]  # no NAME.old-*, no temporary
    assert verify(ckpt)["extra"] == {"step": 1}
    resumed, _opt = tierflow.resume(ckpt, make_tiny("llama"), nvme=tmp_path / "spill2")
    engines.append(resumed)
    assert set(resumed.optimizer_steps.values()) == {1}
    engine.save(tmp_path / "ckpt", extra={"step": 2})  # the fallback itself still works
    assert verify(ckpt)["extra"] == {"step": 2}
    assert [p.name for p in tmp_path.glob("ckpt*")] == ["ckpt"]


# ---------------------------------------------------------------------------- exports

def _fail_step(monkeypatch, fail_at: int | None) -> dict:
    """Count the file-system steps that put an export in place (renames, links, the directory
    exchange) and fail step `fail_at` with EIO."""
    calls = {"n": 0}

    def wrap(real):
        def step(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise OSError(errno.EIO, "simulated I/O error")
            return real(*args, **kwargs)
        return step

    for name in ("rename", "replace", "link", "symlink"):
        monkeypatch.setattr(os, name, wrap(getattr(os, name)))
    monkeypatch.setattr(tf_files, "exchange_dirs", wrap(tf_files.exchange_dirs))
    return calls


def _tree(path: Path) -> dict:
    """Every entry under `path`: a file's bytes, a symlink's target, a folder as None."""
    return {str(p.relative_to(path)): os.readlink(p) if p.is_symlink() else None if p.is_dir() else p.read_bytes()
            for p in sorted(path.rglob("*"))}


def _weights_of(out: Path, old: dict, new: dict) -> str:
    """Which weights directory `out` loads as: "old", "new" or "a mix"."""
    engine = tierflow.load(out, placement="host", trainable=False)
    try:
        state = engine.state_dict()
    finally:
        engine.close()
    same = lambda ref: state.keys() == ref.keys() and all(torch.equal(state[k], v) for k, v in ref.items())
    return "old" if same(old) else "new" if same(new) else "a mix"


def _trained_export(tmp_path, engines):
    """An engine, its export in several shards with a user's files beside them, and its weights
    before (`old`) and after (`new`) one more step."""
    engine, opt = _engine(make_tiny("llama"), "host", tmp_path, engines)
    out = engine.save_pretrained(tmp_path / "export", max_shard_size="24KiB")
    assert len(list(out.glob("model-*.safetensors"))) > 2
    (out / "README.md").write_text("my model")
    (out / "tokenizer").mkdir()
    (out / "tokenizer" / "vocab.txt").write_text("a b c")
    (out / "readme-link").symlink_to("README.md")
    old = {k: v.clone() for k, v in engine.state_dict().items()}
    _step(engine, opt, opt.clip_grad_norm_, make_batches(1)[0])
    return engine, out, old, {k: v.clone() for k, v in engine.state_dict().items()}


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_failed_re_export_leaves_the_complete_old_export(tmp_path, engines, monkeypatch, exchange):
    """Re-exporting into an export with a fault at each file-system step that puts it in place
    (with the directory exchange, and with its two-rename fallback): a CheckpointError, and the
    directory is byte for byte the old export with the user's files, loading as the old weights.
    It used to replace the shards one by one: a failure left old and new ones mixed, and that
    model loaded without an error."""
    engine, out, old, new = _trained_export(tmp_path, engines)
    before = _tree(out)
    with monkeypatch.context() as m:
        if not exchange:
            m.setattr(tf_files, "exchange_dirs", lambda a, b: False)
        probe = tmp_path / "probe"
        shutil.copytree(out, probe, symlinks=True)
        with monkeypatch.context() as counting:
            steps = _fail_step(counting, None)
            engine.save_pretrained(probe, max_shard_size="24KiB")
        assert steps["n"] >= 3, steps  # README, vocab.txt, the link, the swap
        for fail_at in range(1, steps["n"] + 1):
            with monkeypatch.context() as faulty:
                _fail_step(faulty, fail_at)
                with pytest.raises(CheckpointError, match="simulated I/O error"):
                    engine.save_pretrained(out, max_shard_size="24KiB")
            assert _weights_of(out, old, new) == "old", f"step {fail_at} of {steps['n']}"
            assert _tree(out) == before, f"step {fail_at} of {steps['n']}"
    assert sorted(p.name for p in tmp_path.glob("*export*")) == ["export"]  # no temporary, no export.old-*


def test_a_re_export_keeps_the_users_files_and_drops_the_old_shards(tmp_path, engines):
    """A re-export (now in one shard) replaces the old shards and index, loads as the new
    weights, and keeps what the user put beside them: a file, a folder, a symlink. Given as a
    symlink, the directory it names is replaced and the symlink stays."""
    engine, out, old, new = _trained_export(tmp_path, engines)
    users = {k: v for k, v in _tree(out).items() if not k.startswith(("model", "config", "generation"))}
    link = tmp_path / "latest-export"
    link.symlink_to(out)
    assert engine.save_pretrained(link) == link
    assert link.is_symlink() and out.is_dir() and not out.is_symlink()
    after = _tree(out)
    assert {k: after.get(k) for k in users} == users
    assert [k for k in after if k.startswith("model")] == ["model.safetensors"]
    assert _weights_of(out, old, new) == "new"
    assert sorted(p.name for p in tmp_path.glob("*export*")) == ["export", "latest-export"]


def test_an_export_into_a_directory_without_weights_adds_its_files_or_nothing(tmp_path, engines, monkeypatch):
    """A directory of the user's without weights: the export's files are added beside the
    user's; a fault at any step takes back those already moved in, leaving the directory as
    it was (no shards without their config)."""
    engine, _ = _engine(make_tiny("llama"), "host", tmp_path, engines)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    before = _tree(out)
    probe = tmp_path / "probe"
    shutil.copytree(out, probe)
    with monkeypatch.context() as counting:
        steps = _fail_step(counting, None)
        engine.save_pretrained(probe, max_shard_size="24KiB")
    assert steps["n"] > 3, steps  # every shard, the index, the configs
    for fail_at in range(1, steps["n"] + 1):
        with monkeypatch.context() as faulty:
            _fail_step(faulty, fail_at)
            with pytest.raises(CheckpointError, match="simulated I/O error"):
                engine.save_pretrained(out, max_shard_size="24KiB")
        assert _tree(out) == before, f"step {fail_at} of {steps['n']}"
    engine.save_pretrained(out, max_shard_size="24KiB")
    assert (out / "README.md").read_text() == "my notes" and (out / "config.json").is_file()
    state = engine.state_dict()
    assert _weights_of(out, state, state) == "old"


def test_an_io_error_while_spilling_activations_fails_the_engine_and_names_the_file(tmp_path, engines, monkeypatch):
    """A write to the activation spill file fails (disk full): backward raises an NvmeError
    naming the file and what to do (it was a bare OSError), and the engine refuses to step or
    save after it (it trained on), so the last checkpoint stays the last good state."""
    model = make_tiny("llama")
    engine = tierflow.offload(model, activations="offload", placement="nvme", nvme=tmp_path / "spill",
                              host_memory="320KiB", **SMALL_UNITS)  # host: the staging buffers only
    engines.append(engine)
    opt = tierflow.AdamW(engine, lr=LR)
    ids = make_batches(1)[0]
    _step(engine, opt, opt.clip_grad_norm_, ids)
    engine.save(tmp_path / "good")
    good = {p.name: p.read_bytes() for p in (tmp_path / "good").iterdir() if p.is_file()}
    real_pwrite = os.pwrite

    def disk_full_for_activations(fd, data, offset):
        if "tierflow-activations" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", disk_full_for_activations)
    loss = engine(input_ids=ids, labels=ids).loss
    with pytest.raises(NvmeError, match="activation spill file .*tierflow-activations.*disk is full") as info:
        loss.backward()
    assert str(tmp_path / "spill") in str(info.value)
    monkeypatch.undo()
    with pytest.raises(EngineFailedError):
        opt.step()
    with pytest.raises(EngineFailedError):
        engine.save(tmp_path / "good")
    assert {p.name: p.read_bytes() for p in (tmp_path / "good").iterdir() if p.is_file()} == good

