"""Checkpoints: exact resume in every placement, verification of what is loaded, disk-full
and SIGKILL safety, streaming (peak RSS near the budgets, not the state size), and the
Hugging Face format both ways."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import tierflow
from tierflow.checkpoint import CheckpointError, files as tf_files, read_manifest, verify

from conftest import MIX_BUDGETS, SMALL_UNITS, assert_bitwise, assert_state_bitwise, make_batches, make_tiny

MIB = 2**20
LR = 1e-2
PLACEMENTS = ["device", "host", "nvme", "auto"]
SRC = str(Path(tierflow.__file__).parents[1])


def lr_lambda(step: int) -> float:
    """Warm-up then decay, so a wrongly restored schedule changes the numbers."""
    return min(1.0, (step + 1) / 3) * 0.9 ** step


def schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def engine_kwargs(placement: str, nvme: Path) -> dict:
    kwargs = dict(SMALL_UNITS, placement=placement, nvme=nvme)
    if placement == "auto":
        kwargs.update(MIX_BUDGETS)
    return kwargs


def fresh(arch: str, placement: str, nvme: Path, engines: list):
    engine = tierflow.offload(make_tiny(arch), **engine_kwargs(placement, nvme))
    engines.append(engine)
    opt = tierflow.AdamW(engine, lr=LR, weight_decay=0.01)
    return engine, opt, schedule(opt)


def steps(engine, opt, sched, batches) -> list[torch.Tensor]:
    """One optimizer step per batch (accumulating two halves), clipped; returns the losses."""
    losses = []
    for ids in batches:
        for half in ids.chunk(2):
            out = engine(input_ids=half, labels=half)
            (out.loss / 2).backward()
            losses.append(out.loss.detach().clone())
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
    return losses


def tree_digest(path: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


# ---------------------------------------------------------------------------- exact resume

@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_resume_continues_bit_identically(arch, placement, tmp_path, engines):
    """Save after 3 steps, go on for 3 more; a fresh engine resumed from the checkpoint gives
    the same 3 losses, weights, moments, steps and learning rates, bit for bit (GPT-2's dropout
    draws from the restored RNG; the LambdaLR schedule continues)."""
    batches = make_batches(6, batch=4)
    engine, opt, sched = fresh(arch, placement, tmp_path / "spill-a", engines)
    torch.manual_seed(1234)
    steps(engine, opt, sched, batches[:3])
    random.seed(7), np.random.seed(7)
    rng_at_save = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    ckpt = engine.save(tmp_path / "ckpt", scheduler=sched, extra={"step": 3})
    expected = steps(engine, opt, sched, batches[3:])

    torch.manual_seed(999), random.seed(999), np.random.seed(999)  # resume must restore them all
    kwargs = {k: v for k, v in engine_kwargs(placement, tmp_path / "spill-b").items() if k not in SMALL_UNITS}
    resumed, ropt, rsched = tierflow.resume(ckpt, scheduler=schedule, **kwargs)
    engines.append(resumed)
    assert torch.equal(torch.get_rng_state(), rng_at_save[0])
    assert random.getstate() == rng_at_save[1] and np.array_equal(np.random.get_state()[1], rng_at_save[2])
    assert resumed.plan.homes == engine.plan.homes
    assert read_manifest(ckpt)["extra"] == {"step": 3}
    assert rsched.last_epoch == 3
    got = steps(resumed, ropt, rsched, batches[3:])

    assert_bitwise(expected, got, "loss after resume")
    assert_state_bitwise(engine.state_dict(), resumed.state_dict())
    ref_state, got_state = engine.optimizer_state(), resumed.optimizer_state()
    assert set(ref_state) == set(got_state)
    for name, ref in ref_state.items():
        assert ref["step"] == got_state[name]["step"] == 6, name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ref[key], got_state[name][key]), f"{key} of {name}"
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ropt.param_groups]


def test_saving_does_not_change_training(tmp_path, engines):
    """A run that saves after every step equals one that never saves."""
    batches = make_batches(4, batch=4)
    plain, opt, sched = fresh("gpt2", "auto", tmp_path / "a", engines)
    torch.manual_seed(5)
    expected = steps(plain, opt, sched, batches)
    saving, opt2, sched2 = fresh("gpt2", "auto", tmp_path / "b", engines)
    torch.manual_seed(5)
    got = []
    for i, ids in enumerate(batches):
        got += steps(saving, opt2, sched2, [ids])
        saving.save(tmp_path / "ckpt", scheduler=sched2)  # replaces the previous one in place
    assert_bitwise(expected, got, "loss")
    assert_state_bitwise(plain.state_dict(), saving.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "ckpt"], "no temporary leftovers"


def test_frozen_parameters_and_param_groups_survive_resume(tmp_path, engines):
    """A frozen embedding stays frozen (no moments saved), and two param groups keep their
    members and settings."""
    model = make_tiny("llama")
    model.model.embed_tokens.weight.requires_grad_(False)
    engine = tierflow.offload(model, **engine_kwargs("nvme", tmp_path / "a"))
    engines.append(engine)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim == 2]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim != 2]
    opt = tierflow.AdamW(engine, [{"params": decay}, {"params": rest, "weight_decay": 0.0, "lr": 3e-3}], lr=LR)
    sched = schedule(opt)
    batches = make_batches(4, batch=4)
    steps(engine, opt, sched, batches[:2])
    ckpt = engine.save(tmp_path / "ckpt", scheduler=sched)
    expected = steps(engine, opt, sched, batches[2:])
    resumed, ropt, rsched = tierflow.resume(ckpt, scheduler=schedule, nvme=tmp_path / "b")
    engines.append(resumed)
    assert not resumed.module.model.embed_tokens.weight.requires_grad
    assert "model.embed_tokens.weight" not in resumed.optimizer_state()
    assert [len(g["params"]) for g in ropt.param_groups] == [len(decay), len(rest)]
    assert ropt.param_groups[1]["weight_decay"] == 0.0
    assert_bitwise(expected, steps(resumed, ropt, rsched, batches[2:]), "loss after resume")
    assert_state_bitwise(engine.state_dict(), resumed.state_dict())


# ---------------------------------------------------------------------------- verification

def _saved(tmp_path, engines, arch="llama"):
    engine, opt, sched = fresh(arch, "host", tmp_path / "spill", engines)
    steps(engine, opt, sched, make_batches(1, batch=4))
    return engine.save(tmp_path / "ckpt", scheduler=sched)


def _flip_byte(path: Path, at: float = 0.6) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped byte": ("master.safetensors", lambda p: _flip_byte(p), "corrupt"),
    "truncated": ("exp_avg.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-100]), "truncated"),
    "missing": ("exp_avg_sq.safetensors", lambda p: p.unlink(), "missing"),
    "manifest flipped": ("manifest.json", lambda p: p.write_text(p.read_text().replace('"trainable": true', '"trainable": false', 1)),
                         "corrupt"),
    "manifest missing": ("manifest.json", lambda p: p.unlink(), "manifest.json"),
    "header damaged": ("buffers.safetensors", lambda p: _flip_byte(p, 0.0), "corrupt"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_refused_naming_the_file(damage, tmp_path, engines):
    ckpt = _saved(tmp_path, engines)
    name, harm, words = DAMAGE[damage]
    harm(ckpt / name)
    before = tree_digest(ckpt)
    spill = tmp_path / "never-created"
    with pytest.raises(CheckpointError) as info:
        tierflow.resume(ckpt, nvme=spill)
    message = str(info.value)
    assert name in message and words in message, message
    assert tree_digest(ckpt) == before, "a failed load must change nothing"
    assert not spill.exists(), "nothing is built before the checkpoint is verified"


def test_mismatched_model_and_incomplete_names_are_refused(tmp_path, engines):
    ckpt = _saved(tmp_path, engines)
    import transformers

    from conftest import tiny_config

    cfg = tiny_config("llama")
    cfg.intermediate_size = 48  # same names, other shapes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(CheckpointError, match=r"master\.safetensors.*mlp.*shape"):
        tierflow.resume(ckpt, model=other)
    with pytest.raises(CheckpointError, match=r"no parameter transformer\.wte"):
        tierflow.resume(ckpt, model=make_tiny("gpt2"))
    pending = tmp_path / "ckpt.tmp-123-abcd"
    pending.mkdir()
    with pytest.raises(CheckpointError, match="incomplete"):
        tierflow.resume(pending)
    with pytest.raises(CheckpointError, match="does not exist"):
        tierflow.resume(tmp_path / "nope")


@pytest.mark.parametrize("bad", [dict(staging_buffers=2), dict(placement="bogus"), dict(device_memory="abc")])
def test_resume_refuses_bad_options_before_hashing_or_changing_the_model(bad, tmp_path, engines, monkeypatch):
    """The options used to be checked only after every file was hashed and the model's
    requires_grad and buffers were changed."""
    from tierflow.checkpoint import manifest as manifest_module

    ckpt = _saved(tmp_path, engines)
    model = make_tiny("llama")
    model.model.embed_tokens.weight.requires_grad_(False)
    buffers = dict(model.named_buffers())
    monkeypatch.setattr(manifest_module, "file_sha256", lambda p: pytest.fail(f"{p} hashed before the options"))
    with pytest.raises(tierflow.ConfigError):
        tierflow.resume(ckpt, model=model, **bad)
    assert not model.model.embed_tokens.weight.requires_grad
    assert all(b is buffers[n] for n, b in model.named_buffers())


def test_resume_whose_engine_fails_gives_the_model_back_unchanged(tmp_path, engines):
    """requires_grad and buffers are set from the checkpoint before the engine is built: a
    failed engine (here an unusable NVMe directory) puts them back."""
    ckpt = _saved(tmp_path, engines)
    model = make_tiny("llama")
    model.model.embed_tokens.weight.requires_grad_(False)
    buffers = dict(model.named_buffers())
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(tierflow.NvmeError):
        tierflow.resume(ckpt, model=model, nvme=blocker / "spill", placement="nvme")
    assert not model.model.embed_tokens.weight.requires_grad
    assert all(b is buffers[n] for n, b in model.named_buffers())


def test_leftovers_of_dead_writers_are_removed_and_others_kept(tmp_path, engines):
    engine, _, _ = fresh("llama", "host", tmp_path / "spill", engines)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    leftovers = [tmp_path / f"old.tmp-{dead}-0123abcd", tmp_path / f".latest.tmp-{dead}-89abcdef"]
    leftovers[0].mkdir()
    leftovers[1].write_text("step-1")
    keep = [tmp_path / f"ckpt.tmp-{os.getpid()}-0123abcd", tmp_path / "notes.tmp-1-2"]
    for path in keep:
        path.mkdir()
    engine.save(tmp_path / "ckpt")
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in keep)


# ---------------------------------------------------------------------------- write errors

def _count_writes(monkeypatch, fail_at: int | None):
    """Wrap the one function that writes checkpoint bytes: count calls, fail call `fail_at`."""
    calls = {"n": 0}
    real = tf_files.write_all

    def write_all(fd, data):
        calls["n"] += 1
        if calls["n"] == fail_at:
            real(fd, data[: len(data) // 2])  # half of it made it to disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    monkeypatch.setattr(tf_files, "write_all", write_all)
    return calls


def test_disk_full_while_saving_keeps_old_checkpoint_and_training(tmp_path, engines, monkeypatch):
    """ENOSPC at the first write, midway and at the manifest: a clear CheckpointError, the
    previous checkpoint intact and loadable, no leftovers, and training goes on exactly."""
    batches = make_batches(6, batch=4)
    ref, ref_opt, ref_sched = fresh("gpt2", "auto", tmp_path / "ref", engines)
    torch.manual_seed(3)
    expected = steps(ref, ref_opt, ref_sched, batches)

    engine, opt, sched = fresh("gpt2", "auto", tmp_path / "spill", engines)
    torch.manual_seed(3)
    got = steps(engine, opt, sched, batches[:2])
    ckpt = engine.save(tmp_path / "ckpt", scheduler=sched, extra={"step": 2})
    good = tree_digest(ckpt)
    calls = _count_writes(monkeypatch, None)
    engine.save(tmp_path / "probe", scheduler=sched)
    total = calls["n"]
    monkeypatch.undo()
    assert total > 10

    for step, fail_at in enumerate((1, total // 2, total), start=3):
        got += steps(engine, opt, sched, batches[step - 1:step])
        _count_writes(monkeypatch, fail_at)
        with pytest.raises(CheckpointError, match="disk is full") as info:
            engine.save(tmp_path / "ckpt", scheduler=sched, extra={"step": step})
        monkeypatch.undo()
        assert "previous checkpoint" in str(info.value)
        assert tree_digest(ckpt) == good
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "probe", "ref", "spill"]
    assert verify(ckpt)["extra"] == {"step": 2}
    got += steps(engine, opt, sched, batches[5:])
    assert_bitwise(expected, got, "loss with failed saves in between")
    assert_state_bitwise(ref.state_dict(), engine.state_dict())
    engine.save(tmp_path / "ckpt", scheduler=sched, extra={"step": 6})
    assert verify(ckpt)["extra"] == {"step": 6}


def test_not_enough_space_is_reported_before_writing(tmp_path, engines, monkeypatch):
    engine, _, _ = fresh("llama", "host", tmp_path / "spill", engines)
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=4096))
    with pytest.raises(CheckpointError, match="not enough disk space"):
        engine.save(tmp_path / "ckpt")
    assert not any(tmp_path.glob("ckpt*"))


# ---------------------------------------------------------------------------- SIGKILL

class TinyLM(torch.nn.Module):
    """A plain-torch causal LM (no Hugging Face config): tied embedding/head, dropout, a buffer."""

    def __init__(self, vocab: int = 96, dim: int = 32, layers: int = 3):
        super().__init__()
        nn = torch.nn
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(),
                                                  nn.Dropout(0.1), nn.Linear(4 * dim, dim)) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, input_ids, labels=None):
        hidden = self.embed(input_ids)
        for block in self.blocks:
            hidden = hidden + block(hidden)
        logits = self.head(hidden * self.scale)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return types.SimpleNamespace(loss=loss, logits=logits)


KILL_STEPS = 10


def kill_run(root: Path, nvme: Path, report=None, save: bool = True):
    """Train TinyLM (dropout, device/host/NVMe placement) for KILL_STEPS steps, resuming from
    `root`'s latest checkpoint if there is one, and saving after every step."""
    from tierflow.checkpoint import meta_parameters
    from tierflow.cli.checkpointing import save_step

    args = types.SimpleNamespace(output=str(root), keep=2, grad_accum=1)
    if (root / "latest").exists():
        with meta_parameters():
            model = TinyLM()
        engine, opt, sched = tierflow.resume(root, model=model, nvme=nvme, scheduler=schedule)
        start = read_manifest(root)["extra"]["train"]["step"]
    else:
        torch.manual_seed(0)
        engine = tierflow.offload(TinyLM(), **SMALL_UNITS, device_memory="200KiB", host_memory="400KiB", nvme=nvme)
        assert set(engine.plan.homes) == {"device", "host", "nvme"}, engine.plan.homes
        opt = tierflow.AdamW(engine, lr=LR)
        sched = schedule(opt)
        torch.manual_seed(11)
        start = 0
    report = report or (lambda message: None)
    report("TRAINING")
    batches = make_batches(KILL_STEPS, batch=4)
    for step in range(start, KILL_STEPS):
        steps(engine, opt, sched, batches[step:step + 1])
        if save:
            save_step(engine, sched, args, step + 1)
            report(f"SAVED {step + 1}")
    report("DONE")
    return engine


def kill_child(root: Path, nvme: Path, conn) -> None:
    """Child process of the kill test: slow saves (so random kills often land inside one)."""
    real = tf_files.write_all

    def slow_write(fd, data):
        time.sleep(0.005)
        real(fd, data)

    tf_files.write_all = slow_write
    kill_run(root, nvme, report=conn.send).close()


def test_sigkill_at_random_moments_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    """Training that saves after every step is SIGKILLed 3 times at random moments (after 1-2
    more saves, then a random delay: in a step or in the middle of a save), each time resumed
    from the latest complete checkpoint; the final weights equal those of a run that was
    never interrupted, bit for bit, and no partial checkpoint is left behind."""
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")  # children fork from a server that imported once
    ctx.set_forkserver_preload(["torch", "tierflow", "test_checkpoint"])
    forkserver.ensure_running()  # starts importing while the reference runs
    reference = kill_run(tmp_path / "ref", tmp_path / "ref-spill", save=False)
    expected = reference.state_dict()
    reference.close()

    root, rng = tmp_path / "run", random.Random(2024)
    kills, torn, saved = 0, 0, []
    for attempt in range(4):
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=kill_child, args=(root, tmp_path / f"spill-{attempt}", send))
        proc.start()
        send.close()
        messages = [receive.recv() for _ in range(1 + rng.randint(1, 2) if attempt < 3 else 0)]
        if attempt < 3:
            time.sleep(rng.uniform(0.0, 0.5))
            proc.kill()  # SIGKILL
            proc.join()
            assert proc.exitcode == -signal.SIGKILL, "the child must still be running when killed"
            kills += 1
            torn += any(f".tmp-{proc.pid}-" in p.name for p in root.iterdir())
            saved.append(messages[-1])
            continue
        while receive.poll(120) and messages[-1:] != ["DONE"]:
            messages.append(receive.recv())
        proc.join(60)
        assert proc.exitcode == 0 and messages[-1] == "DONE"
    assert kills == 3
    assert not [p.name for p in root.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert (root / "latest").read_text().strip() == f"step-{KILL_STEPS}"
    with tierflow.checkpoint.meta_parameters():
        model = TinyLM()
    resumed, _ = tierflow.resume(root, model=model, nvme=tmp_path / "final-spill")
    try:
        assert_state_bitwise(expected, resumed.state_dict())
    finally:
        resumed.close()
    print(f"{kills} kills (after {', '.join(saved)}), {torn} of them during a save")


# ---------------------------------------------------------------------------- streaming

RSS_CHILD = r'''
import gc, json, sys, time
import torch, tierflow
from tierflow.checkpoint import meta_parameters

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

def reset_peak():
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status("VmRSS")

def build(width=512, pairs=10):
    nn = torch.nn
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
                           for _ in range(pairs)])

mode, ckpt, nvme = sys.argv[1:4]
x = torch.randn(4, 512, generator=torch.Generator().manual_seed(0))
def step(engine, opt):
    loss = engine(x).pow(2).mean(); loss.backward(); opt.step(); opt.zero_grad()
    return loss.item()
result = {}
warm = build(64, 1)  # load the compute kernels before measuring (their code pages count in RSS)
warm(torch.randn(4, 64)).pow(2).mean().backward()
torch.optim.AdamW(warm.parameters(), fused=True).step()
if mode == "save":
    torch.manual_seed(0)
    engine = tierflow.offload(build(), device_memory="16MiB", host_memory="32MiB", nvme=nvme, chunk_bytes="1MiB")
    opt = tierflow.AdamW(engine, lr=1e-4)
    result["loss"] = step(engine, opt)
    engine.flush()
    base = reset_peak()
    start = time.perf_counter()
    engine.save(ckpt)
    result["seconds"] = time.perf_counter() - start
    result["nparams"] = sum(p.numel() for p in engine.module.parameters())
    result["homes"] = sorted(set(engine.plan.homes))
else:
    base = reset_peak()
    start = time.perf_counter()
    with meta_parameters():
        model = build()
    engine, opt = tierflow.resume(ckpt, model=model, nvme=nvme)
    result["seconds"] = time.perf_counter() - start
    result["resume_growth"] = status("VmHWM") - base
    result["loss"] = step(engine, opt)
result["growth"] = status("VmHWM") - base
print("RESULT " + json.dumps(result))
engine.close()
'''


def _run_child(script: str, *args) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc/self/clear_refs")
def test_save_and_resume_stream_with_peak_rss_near_the_budget(tmp_path):
    """A 21M-parameter model whose training state (16 B/param, ~320 MiB) is ~10x the host
    budget (32 MiB; device 16 MiB): saving grows the peak RSS by far less than the budget;
    resuming in a fresh process (model built on the meta device, tensors streamed into
    their tiers) by about the budgets, not the state size.

    The claim tested is the second: growth after a resume and a step stays under 0.3x the
    state (96 MiB; materialising the state would grow it by >= 320 MiB). How far above the
    48 MiB of budgets the peak lands depends on how the threads' allocations interleave and
    when freed buffers go back to the OS: measured 46-60 MiB, once 88 MiB in a fresh venv
    (resume +45.5 MiB, then +43 MiB in the step), so no tighter bound holds reliably."""
    ckpt = tmp_path / "ckpt"
    saved = _run_child(RSS_CHILD, "save", ckpt, tmp_path / "spill-a")
    resumed = _run_child(RSS_CHILD, "resume", ckpt, tmp_path / "spill-b")
    state = 16 * saved["nparams"]
    files = sum(p.stat().st_size for p in ckpt.iterdir())
    summary = (f"state {state / MIB:.0f} MiB, files {files / MIB:.0f} MiB; save: +{saved['growth'] / MIB:.1f} MiB "
               f"in {saved['seconds']:.2f} s; resume: +{resumed['resume_growth'] / MIB:.1f} MiB in "
               f"{resumed['seconds']:.2f} s, +{resumed['growth'] / MIB:.1f} MiB after a step")
    print(summary)
    assert "nvme" in saved["homes"] and state >= 10 * 32 * MIB, summary
    assert saved["growth"] <= 16 * MIB, summary
    assert resumed["growth"] <= 0.3 * state, summary
    assert math.isfinite(resumed["loss"])


# ---------------------------------------------------------------------------- Hugging Face

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_save_pretrained_loads_in_transformers_and_back_into_tierflow(arch, tmp_path, engines):
    """Export (several shards, tied weights once) -> transformers gives the engine's logits;
    tierflow.load of the export gives transformers' logits and trains like it, bit for bit."""
    import transformers

    engine, opt, sched = fresh(arch, "auto", tmp_path / "spill", engines)
    torch.manual_seed(0)
    steps(engine, opt, sched, make_batches(2, batch=4))
    out = engine.save_pretrained(tmp_path / "hf", max_shard_size="24KiB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert (out / "config.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    hf.eval(), engine.eval()
    ids = make_batches(1, batch=2)[0]
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        assert torch.equal(expected, engine(input_ids=ids).logits)

    loaded = tierflow.load(out, **engine_kwargs("nvme", tmp_path / "spill-2"))
    engines.append(loaded)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(expected, loaded(input_ids=ids).logits)
    hf.train(), loaded.train()
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=LR, fused=True)
    tf_opt = tierflow.AdamW(loaded, lr=LR)
    batches = make_batches(2, batch=4, seed=5)
    torch.manual_seed(1)
    ref = steps(hf, _TorchOpt(hf, hf_opt), schedule(hf_opt), batches)
    torch.manual_seed(1)
    got = steps(loaded, tf_opt, schedule(tf_opt), batches)
    assert_bitwise(ref, got, "loss after load")
    assert_state_bitwise(hf.state_dict(), loaded.state_dict())


class _TorchOpt:
    """torch.optim.AdamW with the clip call the engine's optimizer offers."""

    def __init__(self, model, opt):
        self.model, self.opt = model, opt

    def clip_grad_norm_(self, max_norm):
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def step(self):
        self.opt.step()

    def zero_grad(self):
        self.opt.zero_grad()


def test_hf_directory_via_offload_bf16_export_and_truncated_shard(tmp_path, engines):
    """A bfloat16 export loads as bfloat16 in transformers and in tierflow (given to
    tierflow.offload as a directory), with the same logits; a truncated shard is refused."""
    import safetensors.torch
    import transformers

    engine, _, _ = fresh("llama", "host", tmp_path / "spill", engines)
    out = engine.save_pretrained(tmp_path / "hf16", dtype="bfloat16")
    weights = safetensors.torch.load_file(out / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    loaded = tierflow.offload(str(out), placement="host", **SMALL_UNITS)
    engines.append(loaded)
    assert loaded.param_dtype == hf.dtype == torch.bfloat16
    ids = make_batches(1, batch=2)[0]
    engine.eval()
    with torch.no_grad():
        full, expected, got = (m(input_ids=ids).logits for m in (engine, hf, loaded))
    assert torch.equal(expected, got)
    assert torch.allclose(full, got.float(), atol=1e-2)  # bf16 export of the fp32 engine (measured 2.4e-3)
    shard = out / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        tierflow.load(out)


# ---------------------------------------------------------------------------- CLI

def test_cli_resume_continues_the_run_exactly(tmp_path):
    from rich.console import Console

    from tierflow.cli.train import TrainArgs, train

    data = tmp_path / "data.txt"
    data.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(400)))
    common = dict(model="llama-tiny", data=str(data), steps=4, seq_len=32, grad_accum=2, warmup=2, log_every=0,
                  device="cpu", device_memory="3MiB", host_memory="4MiB", nvme=str(tmp_path / "spill"))
    quiet = lambda: Console(file=io.StringIO(), width=200)  # noqa: E731
    full = train(TrainArgs(**common, output=str(tmp_path / "out"), save_every=2, keep=0), console=quiet())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["latest", "step-2", "step-4"]

    (tmp_path / "out" / "latest").write_text("step-2\n")  # as if the run had died after step 2
    resumed = train(TrainArgs(**{**common, "steps": 30, "seed": 5}, resume=str(tmp_path / "out"),
                              export=str(tmp_path / "hf")), console=quiet())
    assert resumed.first_step == 3 and len(resumed.losses) == 2, "the checkpoint's --steps and --seed apply"
    assert resumed.losses == full.losses[2:]
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "latest").read_text().strip() == "step-4"
