"""Generation beyond memory: transformers' generate over tiered weights and a tiered KV cache.

Greedy output must be the same tokens as plain transformers generate (two architectures,
every placement, every KV tier, batches); decode steps read only the non-resident weights,
once for the whole batch; loading streams tensor by tensor (peak RSS well below the model);
bad input fails before loading."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import tierflow
from tierflow.errors import BudgetError, CheckpointError, ConfigError

from conftest import SMALL_UNITS, VOCAB, make_tiny

NEW = 6
MIX = dict(device_memory="200KiB", host_memory="512KiB")


def saved(tmp_path, arch, dtype=torch.float32):
    """A tiny model saved as a Hugging Face directory, and the model itself (eval)."""
    model = make_tiny(arch).to(dtype).eval()
    out = tmp_path / f"hf-{arch}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(out)
    return out, model


def prompts(batch=2, tokens=5, seed=0):
    return torch.randint(1, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def reference(model, ids, **kwargs):
    return model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kwargs)


def load(path, tmp_path, engines, placement="auto", **kwargs):
    options = dict(SMALL_UNITS, **MIX)
    options.update(kwargs)
    engine = tierflow.load(path, nvme=tmp_path / "spill", placement=placement, trainable=False, **options)
    engines.append(engine)
    return engine


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("placement", ["host", "nvme", "auto"])
def test_greedy_output_equals_transformers(tmp_path, engines, arch, placement):
    path, model = saved(tmp_path, arch)
    ids = prompts()
    engine = load(path, tmp_path, engines, placement)
    got = engine.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert torch.equal(got, reference(model, ids))
    report = engine.last_generation
    assert report.new_tokens == NEW and len(report.steps) == NEW and report.batch == 2


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kv", ["host", "nvme"])
def test_kv_cache_tiers_give_the_same_tokens(tmp_path, engines, arch, kv):
    path, model = saved(tmp_path, arch)
    ids = prompts(batch=3)
    engine = load(path, tmp_path, engines, "nvme")
    got = engine.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0, kv_cache=kv)
    assert torch.equal(got, reference(model, ids))
    report = engine.last_generation
    assert report.kv_tier == kv
    if kv == "nvme":  # each decode step reads the whole past of every layer back from the file
        assert all(step.kv_read > 0 for step in report.decode_steps)
    assert engine.budgets["host"].used == engine.plan.staging_bytes  # the cache's bytes were given back


def test_kv_cache_goes_to_host_then_nvme_when_the_device_budget_is_short(tmp_path, engines):
    from tierflow.infer.generate import choose_kv_tier

    path, _ = saved(tmp_path, "llama")
    engine = load(path, tmp_path, engines, "nvme", host_memory="1MiB")
    assert choose_kv_tier(engine, 1, 8)[0] == "device"
    tier, nbytes = choose_kv_tier(engine, 16, 64)
    assert tier == "host" and nbytes > 100 * 2**10
    assert choose_kv_tier(engine, 1024, 64)[0] == "nvme"


def test_padded_batch_with_attention_mask(tmp_path, engines):
    path, model = saved(tmp_path, "llama")
    ids = prompts(batch=3, tokens=6)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding of a shorter prompt
    ids[0, :3] = 0
    engine = load(path, tmp_path, engines, "nvme")
    got = engine.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                          kv_cache="nvme")
    assert torch.equal(got, reference(model, ids, attention_mask=mask))


def test_sampling_matches_transformers_with_the_same_seed(tmp_path, engines):
    path, model = saved(tmp_path, "gpt2")
    ids = prompts()
    engine = load(path, tmp_path, engines, "nvme")
    torch.manual_seed(7)
    expected = model.generate(ids, max_new_tokens=NEW, do_sample=True, pad_token_id=0)
    torch.manual_seed(7)
    got = engine.generate(ids, max_new_tokens=NEW, do_sample=True, pad_token_id=0, kv_cache="host")
    assert torch.equal(got, expected)


def test_decode_reads_only_non_resident_weights_once_per_step_for_the_whole_batch(tmp_path, engines):
    """A mixed placement: host-homed units stay resident (on a CPU they are not even copied);
    each decode step reads each NVMe-homed byte at most once, whatever the batch size."""
    path, _ = saved(tmp_path, "gpt2")
    engine = load(path, tmp_path, engines, device_memory="150KiB", host_memory="450KiB")
    homes = set(engine.plan.homes)
    assert {"host", "nvme"} <= homes, homes
    nvme_bytes = engine.plan.tier_bytes["nvme"]
    # The first forward records the unit order; after it, the units kept from one step to the
    # next settle (the device budget caches some between the ones streamed through it).
    engine.generate(prompts(batch=1), max_new_tokens=2, do_sample=False, pad_token_id=0)
    per_step = {}
    for batch in (1, 8):
        engine.generate(prompts(batch=batch), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        steps = engine.last_generation.decode_steps
        assert all(0 < s.nvme_read <= nvme_bytes for s in steps), [s.nvme_read for s in steps]
        assert all(s.host_to_device <= nvme_bytes for s in steps)  # host-homed units are not copied
        per_step[batch] = sum(s.nvme_read for s in steps) / len(steps)
    assert per_step[8] == per_step[1]  # one weight load serves every sequence


def test_a_tight_budget_still_reads_ahead_and_reads_each_unit_once_per_step(tmp_path, engines):
    """The device budget holds little more than the largest unit in use and one in flight: the
    plan's prefetch window is narrower than any unit. During generation the units still stream
    ahead through the room the budget leaves (a ring): after the first forward, no unit waits
    for a fetch started only when it was needed, no fetched unit is evicted before its use (so
    none is read twice in a step), and the output equals transformers'."""
    path, model = saved(tmp_path, "llama")
    engine = load(path, tmp_path, engines, device_memory="40KiB", host_memory="360KiB", prefetch_bytes=None)
    residency = engine.residency
    streamed = [u.uid for u in engine.units if engine.plan.homes[u.uid] == "nvme"]
    assert len(streamed) >= 10 and engine.plan.prefetch_bytes < min(residency.moving[u] for u in streamed)
    # The first forward records the unit order: nothing was read ahead for the second one.
    engine.generate(prompts(batch=1), max_new_tokens=2, do_sample=False, pad_token_id=0)
    events = []  # what residency did, in order: ("fetch", uid) and ("use", uid)
    start_fetch, acquire = residency.start_fetch, residency.acquire

    def spied_start_fetch(uid, required):
        started = start_fetch(uid, required)
        if started and residency.moving[uid]:
            events.append(("fetch", uid))
        return started

    def spied_acquire(uid):
        flat = acquire(uid)
        events.append(("use", uid))
        return flat

    residency.start_fetch, residency.acquire = spied_start_fetch, spied_acquire
    for batch in (1, 4):
        ids = prompts(batch=batch)
        got = engine.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        assert torch.equal(got, reference(model, ids))
        steps = engine.last_generation.steps
        assert [s.on_demand for s in steps] == [0] * NEW  # every unit was on its way ahead
        assert all(s.nvme_read <= engine.plan.tier_bytes["nvme"] for s in steps)
    waiting = set()  # fetched and not used yet
    for what, uid in events:
        assert not (what == "fetch" and uid in waiting), f"unit {uid} fetched again before its use"
        (waiting.add if what == "fetch" else waiting.discard)(uid)
    assert sum(what == "fetch" for what, _ in events) >= 2 * NEW * len(streamed) - len(streamed)


def test_frozen_units_store_only_compute_dtype_weights(tmp_path, engines):
    path, model = saved(tmp_path, "llama", torch.bfloat16)
    engine = load(path, tmp_path, engines, "nvme")
    placed = engine.placement()
    assert set(placed["nvme"]) == {"weights"}, placed  # no fp32 master, gradients or moments
    total = sum(s.numel for u in engine.units for s in u.slots)
    assert placed["nvme"]["weights"] < 2 * total + len(engine.units) * 2 * 2048 * 2 * 8
    ids = prompts()
    got = engine.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert torch.equal(got, reference(model, ids))
    state = engine.state_dict()  # still readable, in the model's dtype
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_trainable_load_still_keeps_training_state(tmp_path, engines):
    path, _ = saved(tmp_path, "llama")
    engine = tierflow.load(path, nvme=tmp_path / "spill", placement="nvme", **SMALL_UNITS)
    engines.append(engine)
    assert {"master", "grads", "moments"} <= set(engine.placement()["nvme"])


# ---------------------------------------------------------------------------- memory

_RSS_CHILD = textwrap.dedent("""
    import json, sys, torch
    import tierflow, transformers, tierflow.infer.generate
    torch.set_num_threads(1)
    path, spill = sys.argv[1], sys.argv[2]
    # Warm up: imports of the model code and of generate are not the model's memory.
    config = transformers.AutoConfig.from_pretrained(path)
    config.update(dict(hidden_size=24, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, head_dim=12))
    warm = transformers.AutoModelForCausalLM.from_config(config).eval()
    warm.generate(torch.zeros(1, 2, dtype=torch.long), max_new_tokens=2, do_sample=False, pad_token_id=0)
    del warm

    def status(key):  # bytes of a /proc/self/status field
        line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    def peak_rss():  # VmHWM: the high-water mark of this process image (ru_maxrss outlives exec)
        return status("VmHWM")

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = status("VmRSS")
    engine = tierflow.load(path, device_memory="12MiB", host_memory="12MiB", nvme=spill, trainable=False,
                           unit_bytes="2MiB")
    loaded = peak_rss()
    ids = torch.randint(0, 512, (2, 8))
    engine.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    peak = peak_rss()
    print(json.dumps({"base": base, "loaded": loaded, "peak": peak,
                      "nvme": engine.plan.tier_bytes["nvme"], "steps": len(engine.last_generation.steps)}))
    engine.close()
""")


def test_load_and_generate_peak_rss_stays_near_the_budgets(tmp_path):
    """A ~170 MB model, 13x the 12 MiB host budget: loading and generating grow the process
    by about the budgets (12 + 12 MiB) plus a fixed overhead, not by the model."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=2048,
                                      num_hidden_layers=10, num_attention_heads=8, max_position_embeddings=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM(config)
        model.save_pretrained(tmp_path / "hf", max_shard_size="50MB")
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    del model
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    env = dict(PYTHONPATH=str(Path(tierflow.__file__).parent.parent), PATH="/usr/bin:/bin",
               XDG_CACHE_HOME=str(tmp_path / "cache"))  # (nominal figures: not this machine's calibration)
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(tmp_path / "hf"), str(tmp_path / "spill")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    growth = figures["peak"] - figures["base"]
    assert model_bytes > 13 * 12 * 2**20
    assert figures["nvme"] > model_bytes / 2  # most of it really spilled
    assert growth < (24 + 28) * 2**20 and growth < model_bytes / 3, f"peak RSS grew by {growth / 2**20:.1f} MiB for a {model_bytes / 2**20:.0f} MiB model: {figures}"


# ---------------------------------------------------------------------------- bad input

def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        tierflow.load(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no config.json"):
        tierflow.load(tmp_path)


def test_partial_directory_missing_shard_or_tensor(tmp_path):
    import safetensors.torch

    path, _ = saved(tmp_path, "llama")
    weights = safetensors.torch.load_file(path / "model.safetensors")
    key = next(k for k in weights if "layers.1" in k)
    del weights[key]
    safetensors.torch.save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="no tensor for parameter"):
        tierflow.load(path, trainable=False)
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing"):
        tierflow.load(path, trainable=False)


def test_wrong_dtype(tmp_path):
    path, _ = saved(tmp_path, "llama")
    with pytest.raises(ConfigError, match="dtype"):
        tierflow.load(path, dtype="int8", trainable=False)


def test_budget_too_small_fails_before_loading(tmp_path, monkeypatch):
    from tierflow.checkpoint.files import TensorFileReader

    path, _ = saved(tmp_path, "llama")
    reads = []
    original = TensorFileReader.read
    monkeypatch.setattr(TensorFileReader, "read", lambda self, key: reads.append(key) or original(self, key))
    with pytest.raises(BudgetError, match="device_memory"):
        tierflow.load(path, device_memory="4KiB", trainable=False, **SMALL_UNITS)
    with pytest.raises(BudgetError, match="host"):
        tierflow.load(path, device_memory="100KiB", host_memory="16KiB", trainable=False, **SMALL_UNITS)
    with pytest.raises(ConfigError, match="host_memory"):
        tierflow.load(path, host_memory="lots", trainable=False)
    assert reads == []  # nothing was read


def test_kv_cache_that_does_not_fit(tmp_path, engines):
    path, _ = saved(tmp_path, "llama")
    engine = load(path, tmp_path, engines, "nvme", host_memory="400KiB")
    with pytest.raises(BudgetError, match="KV cache"):
        engine.generate(prompts(batch=64, tokens=32), max_new_tokens=32, do_sample=False, pad_token_id=0,
                        kv_cache="host")
    with pytest.raises(ConfigError, match="kv_cache"):
        engine.generate(prompts(), max_new_tokens=2, kv_cache="disk")


# ---------------------------------------------------------------------------- CLI

def test_cli_generate_streams_and_summarises(tmp_path, capsys):
    from tierflow.cli.main import main

    path, _ = saved(tmp_path, "gpt2")  # no tokenizer files, a vocabulary of 96: not the byte vocabulary
    bytes_ = ["--tokenizer", "bytes"]
    status = main(["generate", "--model", str(path), "--prompt", "!#", "--max-new-tokens", "4",
                   "--device-memory", "256KiB", "--host-memory", "1MiB", "--nvme", str(tmp_path / "spill")] + bytes_)
    out, err = capsys.readouterr()
    assert status == 0
    assert "tokens/s" in out and "NVMe weights" in out
    assert "tokenizer: bytes" in err
    status = main(["generate", "--model", str(path), "--prompt", "!#", "--prompt", "$",
                   "--max-new-tokens", "3", "--kv-cache", "nvme", "--nvme", str(tmp_path / "spill")] + bytes_)
    out = capsys.readouterr().out
    assert status == 0 and "[1] $" in out and "KV cache (nvme" in out
    assert main(["generate", "--model", str(tmp_path / "none"), "--prompt", "x"]) == 2
    assert main(["generate", "--model", str(path), "--prompt", "abc"] + bytes_) == 2  # ids beyond the vocabulary
    assert "vocabulary" in capsys.readouterr().err
    # Without --tokenizer, bytes are not silently assumed for a vocabulary that is not theirs.
    assert main(["generate", "--model", str(path), "--prompt", "!#"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no tokenizer files" in err and "--tokenizer" in err, err


# ---------------------------------------------------------------------------- CUDA

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("placement", ["host", "nvme"])
@pytest.mark.parametrize("kv", ["device", "host", "nvme"])
def test_cuda_greedy_output_equals_transformers(tmp_path, engines, arch, placement, kv):
    """Weights streamed from pinned host memory and NVMe to the GPU, KV cache in each tier:
    the same tokens as transformers on the GPU."""
    path, model = saved(tmp_path, arch)
    ids = prompts(batch=3).cuda()
    expected = reference(model.cuda(), ids)
    engine = load(path, tmp_path, engines, placement, device="cuda")
    got = engine.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0, kv_cache=kv)
    assert torch.equal(got, expected)
    # Weights travelled to the GPU (units that fit the device budget may stay there between
    # decode steps: the tiny Llama's did on an H100, so no per-step assertion).
    assert engine.last_generation.total("host_to_device") > 0


@pytest.mark.parametrize("kv", ["host", "nvme"])
def test_tiered_cache_is_passed_without_a_deprecation_warning(tmp_path, engines, kv):
    """transformers 5.x deprecates generate's `past_key_values=` for `cache=`: the tiered cache
    goes in by the keyword the installed version takes, so no FutureWarning is raised."""
    path, model = saved(tmp_path, "llama")
    ids = prompts(batch=2)
    engine = load(path, tmp_path, engines, "nvme")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = engine.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0, kv_cache=kv)
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
                    and "past_key_values" in str(w.message)]
    assert not deprecations, deprecations
    assert engine.last_generation.kv_tier == kv
    assert torch.equal(got, reference(model, ids))
