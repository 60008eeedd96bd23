"""Bad input: tierflow.offload raises a clear error (tierflow.errors type, message naming
the problem and what to change) before training starts, and leaves the model intact."""
from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import tierflow
import tierflow.memory.nvme as nvme_module
from conftest import open_files_under
from tierflow.errors import BudgetError, ConfigError, NvmeError, TierflowError

SMALL = dict(unit_bytes="8KiB", chunk_bytes="32KiB")


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 64))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_intact(model, before):
    """No data lost, no hooks left behind, the model still runs as a plain model."""
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed by a failed offload"
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"hooks left on {module}"
    for param in model.parameters():
        assert not param._post_accumulate_grad_hooks, "gradient hooks left behind"
    ref = make_model()
    x = torch.randint(0, 64, (2, 5))
    assert torch.equal(model(x), ref(x))


def expect(exc_type, *words, **kwargs):
    """Call offload on a fresh model; assert the error type and that the message names
    every word (case-insensitive); assert the model is intact afterwards. Returns the error."""
    model = kwargs.pop("model", None) or make_model()
    before = snapshot(model)
    with pytest.raises(exc_type) as info:
        engine = tierflow.offload(model, **kwargs)
        engine.close()
    message = str(info.value)
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in error message: {message}"
    assert isinstance(info.value, TierflowError)
    if isinstance(model, nn.Sequential) and len(model) == 4:
        assert_intact(model, before)
    return info.value


# ---------------------------------------------------------------------------- NVMe directory

def test_nvme_directory_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    err = expect(NvmeError, str(blocker / "spill"), "cannot create", "pass a directory",
                 nvme=blocker / "spill", placement="nvme", **SMALL)
    assert err.errno == errno.ENOTDIR
    assert blocker.read_text() == "not a directory"


def test_nvme_path_is_a_regular_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    expect(NvmeError, str(blocker), "directory", nvme=blocker, placement="nvme", **SMALL)
    assert blocker.read_text() == "keep me"


def test_nvme_directory_that_cannot_be_written():
    # /proc/self is a directory no one (not even root) can create files in.
    expect(NvmeError, "/proc/self", "pass another directory", nvme="/proc/self", placement="nvme", **SMALL)


def test_nvme_directory_without_room_for_the_spill(tmp_path, monkeypatch, spill_io):
    spill = tmp_path / "spill"
    real_statvfs = os.statvfs

    def tiny_disk(path):
        st = real_statvfs(path)
        fields = {name: getattr(st, name) for name in dir(st) if name.startswith("f_")}
        fields.update(f_bavail=4, f_bfree=4, f_frsize=4096)  # 16 KiB free
        return types.SimpleNamespace(**fields)

    monkeypatch.setattr(nvme_module.os, "statvfs", tiny_disk)
    err = expect(NvmeError, str(spill), "free", "larger disk", nvme=spill, placement="nvme", **SMALL)
    assert err.errno == errno.ENOSPC
    assert spill_io["writes"] == 0, "nothing may be spilled before the space check"
    assert not open_files_under(spill), "the refused spill file is still open"


def test_missing_nvme_directory_is_created(tmp_path, engines):
    spill = tmp_path / "not" / "yet" / "there"
    model = make_model()
    engine = tierflow.offload(model, nvme=spill, placement="nvme", **SMALL)
    engines.append(engine)
    assert spill.is_dir()
    assert engine.plan.tier_bytes["nvme"] > 0  # it spills there (into a file unlinked once open)
    opt = tierflow.AdamW(engine, lr=1e-2)
    x = torch.randint(0, 64, (2, 5))
    engine(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
    assert engine.state_dict()["1.weight"].dtype == torch.float32


def test_placement_nvme_without_directory():
    expect(ConfigError, "placement='nvme'", "nvme=DIR", placement="nvme", **SMALL)


# ---------------------------------------------------------------------------- budgets

def test_device_budget_too_small_for_one_layer():
    expect(BudgetError, "device_memory", "too small", "raise device_memory", device_memory="16KiB")
    expect(BudgetError, "device_memory", "raise device_memory", device_memory=0)


def test_host_budget_too_small_without_nvme():
    expect(BudgetError, "does not fit", "host_memory", "nvme=DIR", device_memory="64KiB", host_memory="64KiB",
           **SMALL)


def test_host_budget_too_small_for_nvme_staging_buffers(tmp_path):
    expect(BudgetError, "staging", "host_memory", device_memory="64KiB", host_memory="64KiB",
           nvme=tmp_path / "spill", **SMALL)


# ---------------------------------------------------------------------------- device, sizes, dtypes

def test_unknown_device():
    expect(ConfigError, "'tpu'", "cpu", "cuda", device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda():
    expect(ConfigError, "CUDA is not available", "device='cpu'", device="cuda")


@pytest.mark.parametrize("what", ["device_memory", "host_memory", "unit_bytes"])
def test_unparseable_size(what):
    expect(ConfigError, what, "'12 parsecs'", "GiB", **{what: "12 parsecs"})


def test_negative_size():
    expect(ConfigError, "host_memory", "negative", host_memory=-5)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_size_that_is_not_finite(value):
    expect(ConfigError, "host_memory", "finite", repr(value), host_memory=value)


@pytest.mark.parametrize("what, value", [("staging_buffers", "abc"), ("staging_buffers", 5.9), ("io_threads", 2.7),
                                         ("io_threads", True)])
def test_count_that_is_not_a_whole_number(what, value):
    """5.9 staging buffers used to become 5 without a word, and 'abc' a bare ValueError."""
    expect(ConfigError, what, "whole number", repr(value), **{what: value})


def test_direct_io_that_is_not_a_bool():
    expect(ConfigError, "direct_io", "'false'", "True, False or None", direct_io="false")


def test_empty_nvme_directory():
    """Path('') is the current directory: the spill file would land wherever the process runs."""
    expect(ConfigError, "nvme=''", "directory", nvme="")


@pytest.mark.parametrize("value", [0, "0.3"])
def test_unit_bytes_of_zero(value):
    """0 used to mean "choose it for me" without a word."""
    expect(ConfigError, "unit_bytes", "more than 0", "unset", unit_bytes=value)


def test_unknown_option_names_the_valid_ones():
    expect(ConfigError, "'foo'", "unit_bytes", "staging_buffers", foo=1)


def test_unsupported_dtype():
    expect(ConfigError, "int8", "bfloat16", "float32", dtype=torch.int8)
    expect(ConfigError, "float64", "bfloat16", dtype="float64")


def test_unknown_placement():
    expect(ConfigError, "'gpu'", "'auto'", "'nvme'", placement="gpu")


def test_chunk_bytes_not_a_multiple_of_4096():
    expect(ConfigError, "chunk_bytes", "4096", chunk_bytes=5000)


def test_unknown_update_device():
    expect(ConfigError, "update_on", "'cpu'", "'device'", update_on="gpu")


def test_host_in_place_on_a_gpu(monkeypatch):
    """Only a CPU computes on host memory; unset, the option follows the device."""
    import tierflow.config as config

    assert config.OffloadConfig.create(device="cpu").host_in_place
    assert not config.OffloadConfig.create(device="cpu", host_in_place=False).host_in_place
    monkeypatch.setattr(config, "parse_device", lambda device: torch.device("cuda", 0))
    assert not config.OffloadConfig.create(device="cuda").host_in_place
    with pytest.raises(ConfigError, match="host_in_place=True needs a CPU"):
        config.OffloadConfig.create(device="cuda", host_in_place=True)


# ---------------------------------------------------------------------------- models

class IntegerParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.codes = nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False)


def test_model_with_integer_parameter():
    model = IntegerParam()
    before = snapshot(model)
    with pytest.raises(ConfigError) as info:
        tierflow.offload(model)
    message = str(info.value)
    assert "codes" in message and "int64" in message, message
    # What to change: keep integer data as a buffer (register_buffer) or cast it.
    assert re.search(r"buffer|cast|\.float\(\)", message), f"the message must say what to change: {message}"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_model_with_meta_parameters():
    with torch.device("meta"):
        model = nn.Linear(4, 4)
    with pytest.raises(ConfigError) as info:
        tierflow.offload(model)
    message = str(info.value)
    assert "meta" in message and "weight" in message and "materialise" in message.replace("materialize", "materialise")
    # A fix the message names must exist.
    for api in re.findall(r"tierflow\.(\w+)", message):
        assert hasattr(tierflow, api), f"the error message recommends tierflow.{api}, which does not exist: {message}"


def test_model_with_mixed_parameter_dtypes():
    model = make_model()
    model[3].to(torch.bfloat16)
    before = snapshot(model)
    with pytest.raises(ConfigError) as info:
        tierflow.offload(model)
    message = str(info.value)
    assert "bfloat16" in message and "float32" in message and "model.float()" in message, message
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert model[3].weight.dtype == torch.bfloat16


def test_not_a_module_and_no_parameters():
    with pytest.raises(ConfigError, match="nn.Module"):
        tierflow.offload("model.safetensors")
    with pytest.raises(ConfigError, match="no parameters"):
        tierflow.offload(nn.ReLU())


# ---------------------------------------------------------------------------- recovery

def test_failed_offload_then_valid_offload_trains(tmp_path, engines):
    """After a failed offload the same model object can be offloaded with fixed arguments."""
    model = make_model()
    with pytest.raises(BudgetError):
        tierflow.offload(model, device_memory="16KiB")
    with pytest.raises(NvmeError):
        blocker = tmp_path / "f"
        blocker.write_text("")
        tierflow.offload(model, nvme=blocker / "x", placement="nvme", **SMALL)
    ref = make_model()
    engine = tierflow.offload(model, nvme=tmp_path / "spill", placement="nvme", **SMALL)
    engines.append(engine)
    x = torch.randint(0, 64, (2, 5))
    assert torch.equal(engine(x), ref(x))
    assert len([h for h in model._forward_pre_hooks.values()]) == 1, "exactly one set of engine hooks"


# ---------------------------------------------------------------------------- a model already offloaded

def test_offloading_a_model_held_by_an_open_engine_is_refused(tmp_path, engines):
    """The first engine replaced the parameters with NaN placeholders: a second engine over
    the same model would train from them. Refused before any work; the first engine still works."""
    model, ref = make_model(), make_model()
    engine = tierflow.offload(model, nvme=tmp_path / "spill", placement="nvme", **SMALL)
    engines.append(engine)
    with pytest.raises(ConfigError, match="held by a tierflow engine.*use that engine"):
        tierflow.offload(model, nvme=tmp_path / "spill", placement="nvme", **SMALL)
    with pytest.raises(ConfigError, match="held by a tierflow engine"):
        tierflow.offload(model[1])  # a part of it too
    x = torch.randint(0, 64, (2, 5))
    assert torch.equal(engine(x), ref(x))


def test_offloading_again_after_close_without_the_weights_given_back_is_refused(tmp_path):
    model = make_model()
    tierflow.offload(model, nvme=tmp_path / "spill", placement="nvme", **SMALL).close()
    with pytest.raises(ConfigError, match="closed without giving them back.*build a new model"):
        tierflow.offload(model)


def test_offloading_again_after_close_with_the_weights_given_back_works(engines):
    """Every unit computed where its state lives: the parameters view real data after close."""
    model, ref = make_model(), make_model()
    tierflow.offload(model, placement="device").close()
    engine = tierflow.offload(model, placement="device")
    engines.append(engine)
    x = torch.randint(0, 64, (2, 5))
    assert torch.equal(engine(x), ref(x))


# ---------------------------------------------------------------------------- optimizer settings

@pytest.mark.parametrize("setting", [dict(lr=float("inf")), dict(lr=float("nan")), dict(lr=-1.0),
                                     dict(eps=float("nan")), dict(eps=-1e-8), dict(weight_decay=float("nan")),
                                     dict(weight_decay=-1.0), dict(weight_decay=float("inf")),
                                     dict(betas=(0.9, float("nan"))), dict(betas=(1.0, 0.999))])
def test_adamw_refuses_settings_that_are_not_finite_or_out_of_range(engines, setting):
    """Such a step turned every weight into NaN, and a checkpoint saved after it held them."""
    engine = tierflow.offload(make_model(), placement="device")
    engines.append(engine)
    name = next(iter(setting))
    with pytest.raises(ConfigError, match=f"invalid {'learning rate' if name == 'lr' else name}"):
        tierflow.AdamW(engine, **setting)
    with pytest.raises(ValueError):  # torch's error type too
        tierflow.AdamW(engine, params=[{"params": list(engine.module.parameters()), **setting}])


# ---------------------------------------------------------------------------- failure late in setup

def test_a_failure_at_the_end_of_setup_leaves_the_model_as_it_was(tmp_path, monkeypatch):
    """The state is in its tiers, threads run, parameters are placeholders and hooks are in
    place when the last step of setup fails: all of it is undone."""
    import threading

    from tierflow.runtime import expert_hooks

    def fail(engine, model):
        raise ConfigError("injected at the end of setup")

    monkeypatch.setattr(expert_hooks, "install", fail)
    model = make_model()
    before = snapshot(model)
    tensors = {name: (p.untyped_storage().data_ptr(), p.stride()) for name, p in model.named_parameters()}
    threads = set(threading.enumerate())
    with pytest.raises(ConfigError, match="injected"):
        tierflow.offload(model, nvme=tmp_path / "spill", activations="offload", placement="nvme", **SMALL)
    for name, param in model.named_parameters():
        assert (param.untyped_storage().data_ptr(), param.stride()) == tensors[name], f"{name} was not given back"
    left = [t.name for t in set(threading.enumerate()) - threads if t.name.startswith("tierflow")]
    assert not left, f"threads left running: {left}"
    assert not list((tmp_path / "spill").glob("tierflow-*")), "spill file left behind"
    assert_intact(model, before)
    monkeypatch.undo()
    engine = tierflow.offload(model, nvme=tmp_path / "spill", placement="nvme", **SMALL)  # not held
    engine.close()


# ---------------------------------------------------------------------------- staging buffers

STAGING_CHILD = r'''
import os, sys, threading, tempfile
import torch
from torch import nn
import tierflow

def watchdog(label):
    timer = threading.Timer(10.0, lambda: (print("HANG " + label, flush=True), os._exit(3)))
    timer.daemon = True
    timer.start()
    return timer

for staging, dtype in ((2, None), (3, None), (4, torch.bfloat16)):
    label = f"staging_buffers={staging} dtype={dtype}"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 32), nn.Linear(32, 64))
    try:
        engine = tierflow.offload(model, nvme=tempfile.mkdtemp(), placement="nvme", unit_bytes="8KiB",
                                  chunk_bytes="32KiB", staging_buffers=staging, dtype=dtype)
    except tierflow.ConfigError as exc:
        assert "staging_buffers" in str(exc), exc
        print("REFUSED " + label, flush=True)
        continue
    timer = watchdog(label)
    opt = tierflow.AdamW(engine, lr=1e-2)
    x = torch.randint(0, 64, (2, 5))
    for step in range(2):
        engine(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    engine.state_dict()
    engine.close()
    timer.cancel()
    print("TRAINED " + label, flush=True)
'''


def test_few_staging_buffers_train_or_are_refused():
    """staging_buffers is accepted down to 2, but one AdamW window on NVMe state holds four
    arrays (master, grad, exp_avg, exp_avg_sq; five with bf16 weights). Each value must
    either be refused by offload with a ConfigError naming staging_buffers, or train;
    it must never hang. (Run in a subprocess with a watchdog so a hang cannot block the suite.)"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(tierflow.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", STAGING_CHILD], capture_output=True, text=True, timeout=120,
                          env=env)
    lines = [l for l in proc.stdout.splitlines() if l.split(" ")[0] in ("HANG", "REFUSED", "TRAINED")]
    hangs = [l for l in lines if l.startswith("HANG")]
    assert not hangs, f"training hung (no staging buffer ever frees up): {hangs}; stderr: {proc.stderr[-2000:]}"
    assert proc.returncode == 0 and len(lines) == 3, proc.stdout + proc.stderr[-3000:]


def test_disk_full_while_offloading_loses_nothing(tmp_path, monkeypatch):
    """The disk fills up while state is being written to NVMe: a clear NvmeError, the model's
    parameters untouched (originals are freed only once every unit is in place), the spill
    file removed."""
    model = make_model()
    before = snapshot(model)
    real_pwritev = os.pwritev
    calls = {"n": 0}

    def failing_pwritev(fd, buffers, offset, *args):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwritev(fd, buffers, offset, *args)

    monkeypatch.setattr(os, "pwritev", failing_pwritev)
    with pytest.raises(NvmeError, match="(?i)full|space"):
        tierflow.offload(model, nvme=tmp_path, placement="nvme", **SMALL)
    monkeypatch.setattr(os, "pwritev", real_pwritev)
    assert calls["n"] > 3, "the fault was never injected"
    assert_intact(model, before)
    assert not list(tmp_path.iterdir()), "the spill file was left behind"
    assert not open_files_under(tmp_path), "the failed store's spill file is still open"


_DIES_WITHOUT_CLOSE = """
import os, signal, sys, torch
from torch import nn
import tierflow
torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
engine = tierflow.offload(model, nvme=sys.argv[1], placement="nvme", activations="offload",
                          host_memory="330KiB", unit_bytes="8KiB", chunk_bytes="32KiB")
engine(torch.randn(4, 64)).square().mean().backward()  # the activations' spill file is open too
print(engine.plan.tier_bytes["nvme"], flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no close, no atexit, no finalizer
"""


def test_a_killed_process_leaves_no_spill_file_behind(tmp_path):
    """The scratch files are unlinked as soon as they are open: however the process ends, their
    space goes back to the disk and nothing is left in the NVMe directory."""
    spill = tmp_path / "spill"
    out = subprocess.run([sys.executable, "-c", _DIES_WITHOUT_CLOSE, str(spill)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == -9, out.stderr[-2000:]
    assert int(out.stdout.split()[0]) > 0  # it did spill
    assert spill.is_dir() and not list(spill.rglob("*")), list(spill.rglob("*"))
