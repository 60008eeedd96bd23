"""Memory: the engine's accounted device and host bytes never exceed the budgets, at any
point of a step; and the peak RSS of a run with NVMe placement stays near the budgets,
not near the model's training-state size."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import tierflow
from tierflow.errors import BudgetError

from conftest import SMALL_UNITS, assert_bitwise, assert_state_bitwise, make_batches, make_tiny, torch_clip, train

KIB, MIB = 2**10, 2**20


class BudgetRecorder:
    """Samples the engine's budgets from forward hooks of every module, gradient hooks of
    every parameter (backward), and a background thread (everything in between)."""

    def __init__(self, engine):
        self.engine = engine
        self.samples = {"device": [], "host": []}
        self.hook_samples = 0
        self._stop = threading.Event()
        self._handles = []
        for module in engine.module.modules():
            self._handles.append(module.register_forward_pre_hook(lambda *a: self.sample()))
            self._handles.append(module.register_forward_hook(lambda *a: self.sample()))
        for param in engine.module.parameters():
            if param.requires_grad:
                self._handles.append(param.register_hook(lambda g: self.sample()))
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def sample(self, from_hook=True):
        for name, budget in self.engine.budgets.items():
            self.samples[name].append((budget.used, budget.capacity))
        self.hook_samples += from_hook

    def _poll(self):
        while not self._stop.is_set():
            self.sample(from_hook=False)
            time.sleep(0.0002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        for handle in self._handles:
            handle.remove()

    def check(self):
        for name, samples in self.samples.items():
            over = [(used, cap) for used, cap in samples if cap is not None and used > cap]
            assert not over, f"{name} budget exceeded at {len(over)} of {len(samples)} samples: {over[:5]}"
            peak, cap = self.engine.budget_peaks()[name]
            assert cap is not None and peak <= cap, f"{name}: peak {peak} > capacity {cap}"
            assert max(used for used, _ in samples) <= peak


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_accounted_bytes_never_exceed_budgets(arch, tmp_path, engines):
    model = make_tiny(arch)
    engine = tierflow.offload(model, **SMALL_UNITS, device_memory="200KiB", host_memory="768KiB",
                              nvme=tmp_path / "spill")
    engines.append(engine)
    assert set(engine.plan.homes) == {"device", "host", "nvme"}
    opt = tierflow.AdamW(engine, lr=1e-2)
    with BudgetRecorder(engine) as rec:
        train(engine, opt, opt.clip_grad_norm_, make_batches(8), 2)
        engine.state_dict()
    assert rec.hook_samples > 100
    rec.check()
    for name in ("device", "host"):
        peak, cap = engine.budget_peaks()[name]
        assert peak >= 0.6 * cap, f"the {name} budget must actually bind (peak {peak} of {cap})"


def _offload_at_minimum_device_budget(arch, tmp_path):
    """The smallest device_memory (in 4 KiB steps) that offload accepts, and its engine."""
    for kib in range(16, 1024, 4):
        model = make_tiny(arch)
        try:
            engine = tierflow.offload(model, **SMALL_UNITS, device_memory=f"{kib}KiB", placement="auto",
                                      host_memory="768KiB", nvme=tmp_path / "spill")
        except BudgetError as exc:
            assert "device_memory" in str(exc)
            continue
        return kib, model, engine
    raise AssertionError("no device budget accepted")


def test_minimum_device_budget_trains_exactly_within_budget(tmp_path, engines):
    """At the smallest device budget the plan accepts (no room to prefetch, every unit
    evicted after use), training stays within the budget and equal to torch."""
    kib, model, engine = _offload_at_minimum_device_budget("llama", tmp_path)
    engines.append(engine)
    assert engine.plan.prefetch_bytes < 8 * KIB and "device" not in engine.plan.homes
    batches = make_batches(6)
    ref = make_tiny("llama")
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.01, fused=True)
    ref_losses, ref_norms = train(ref, ref_opt, torch_clip(ref), batches, 2)
    opt = tierflow.AdamW(engine, lr=1e-2, weight_decay=0.01)
    with BudgetRecorder(engine) as rec:
        losses, norms = train(engine, opt, opt.clip_grad_norm_, batches, 2)
    rec.check()
    assert_bitwise(ref_losses, losses, "loss")
    assert_bitwise(ref_norms, norms, "grad norm")
    assert_state_bitwise(ref.state_dict(), engine.state_dict())


# ---------------------------------------------------------------------------- peak RSS

RSS_CHILD = r'''
import gc, json, sys, time
import torch, transformers, tierflow

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)

placement, nvme = sys.argv[1], sys.argv[2]
cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1536, num_hidden_layers=10,
                               num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128,
                               tie_word_embeddings=False, use_cache=False)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(cfg)
nparams = sum(p.numel() for p in model.parameters())
gc.collect()
rss_built = status("VmRSS")
kw = dict(placement=placement)
if placement == "nvme":
    kw.update(device_memory="32MiB", host_memory="64MiB", nvme=nvme, chunk_bytes="1MiB")
engine = tierflow.offload(model, **kw)
opt = tierflow.AdamW(engine, lr=1e-4)
gc.collect()
rss_offloaded = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                      # reset VmHWM to the current RSS
hwm_reset = status("VmHWM")
ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
losses = []
for step in range(2):
    out = engine(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.clip_grad_norm_(1.0)
    opt.step()
    opt.zero_grad()
    losses.append(out.loss.item())
engine.flush()
peak = status("VmHWM")
print("RESULT " + json.dumps(dict(nparams=nparams, rss_built=rss_built, rss_offloaded=rss_offloaded,
                                  hwm_reset=hwm_reset, peak=peak, losses=losses,
                                  homes=sorted(set(engine.plan.homes)),
                                  budget_peaks=engine.budget_peaks())))
engine.close()
'''


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc/self/clear_refs")
def test_peak_rss_with_nvme_stays_near_budget_not_model_size(tmp_path):
    """A 34M-parameter Llama (training state 16 B/param = 550 MB) trained 2 steps:
    with placement="nvme", device_memory=32MiB and host_memory=64MiB, the peak RSS grows
    over the post-offload baseline by about the budgets, far below the state size; with
    everything in host memory (no budgets) the process holds about the whole state."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(tierflow.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    procs = {placement: subprocess.Popen([sys.executable, "-c", RSS_CHILD, placement, str(tmp_path / "spill")],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for placement in ("nvme", "host")}
    results = {}
    for placement, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            raise
        assert proc.returncode == 0, f"{placement} run failed:\n{err[-3000:]}"
        line = [l for l in out.splitlines() if l.startswith("RESULT ")][-1]
        results[placement] = json.loads(line[len("RESULT "):])

    nvme, host = results["nvme"], results["host"]
    state = 16 * nvme["nparams"]
    assert 20e6 <= nvme["nparams"] <= 50e6
    assert nvme["homes"] == ["nvme"] and host["homes"] == ["host"]
    assert nvme["losses"] == host["losses"], "both placements must train identically"
    budgets = 32 * MIB + 64 * MIB
    for name, cap in (("device", 32 * MIB), ("host", 64 * MIB)):
        assert nvme["budget_peaks"][name][0] <= cap

    growth = nvme["peak"] - nvme["hwm_reset"]           # over the post-offload baseline
    over_model = nvme["peak"] - nvme["rss_built"]        # over the process holding the fp32 model
    summary = (f"nvme: growth {growth / MIB:.0f} MiB, peak - built {over_model / MIB:.0f} MiB; host: peak - built "
               f"{(host['peak'] - host['rss_built']) / MIB:.0f} MiB; state {state / MIB:.0f} MiB")
    # Budgets plus 64 MiB for what the engine does not account: activations, autograd, the
    # allocator's slack, thread stacks.
    assert growth <= budgets + 64 * MIB, summary
    assert growth <= 0.35 * state, summary
    assert over_model <= 0.35 * state, summary
    # The same run with all state in host memory holds (at least) the whole training state.
    host_over_model = host["peak"] - host["rss_built"]
    assert host_over_model >= 0.75 * state, summary
    assert host["peak"] - nvme["peak"] >= 0.5 * state, summary


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
def test_cpu_training_reuses_freed_blocks_and_generation_returns_them(engines):
    """Training on a CPU keeps the blocks a step frees for the next backward (memory.device:
    reuse_freed_blocks); generation lowers the threshold again (its heap must stay small)."""
    from tierflow.memory import device as device_memory

    engine = tierflow.offload(make_tiny("llama"), **SMALL_UNITS, placement="host")
    engines.append(engine)
    opt = tierflow.AdamW(engine, lr=1e-3)
    ids = make_batches(1)[0]
    engine(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    assert device_memory.mmap_threshold() == device_memory.REUSE_BLOCKS_UP_TO
    engine.generate(ids[:, :4], max_new_tokens=1, do_sample=False)
    assert device_memory.mmap_threshold() <= 1 << 20
