"""Shared fixtures of the engine tests: tiny models, batches, and a train loop that runs
the same schedule on plain PyTorch and on a tierflow engine."""
from __future__ import annotations

import copy
import os
import types
import warnings

import pytest
import torch

VOCAB = 96

# Small units and staging buffers, so that even a tiny model is split into many units
# that really stream between tiers (chunk_bytes must be a multiple of 4096).
SMALL_UNITS = dict(unit_bytes="8KiB", chunk_bytes="32KiB", prefetch_bytes="40KiB")
# Budgets that give the tiny GPT-2 and Llama below a mix of device, host and NVMe homes.
MIX_BUDGETS = dict(device_memory="200KiB", host_memory="768KiB")


@pytest.fixture(autouse=True, scope="session")
def private_calibration_cache(tmp_path_factory):
    """Engines plan with this machine's cached calibration (planner.py): the tests use an empty
    cache of their own, so every run plans with the same nominal figures."""
    import os

    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


def tiny_config(arch: str):
    import transformers

    if arch == "gpt2":  # tied input/output embeddings (wte / lm_head)
        return transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=0, eos_token_id=0)
    if arch == "llama":
        return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64)
    raise ValueError(arch)


def make_tiny(arch: str, seed: int = 0):
    """A tiny causal LM with a fixed random init."""
    import transformers

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch))
    if arch == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight, "GPT-2 must tie wte and lm_head"
    return model


def make_batches(n: int, batch: int = 2, seq: int = 16, vocab: int = VOCAB, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(n)]


def lm_batch(ids):
    return {"input_ids": ids, "labels": ids}


def train(module, opt, clip, microbatches, accum: int, sched=None, make_kwargs=lm_batch, loss_of=None,
          before_step=None, seed: int = 123):
    """Run len(microbatches)//accum optimizer steps; returns (losses, grad norms).

    `clip(max_norm)` is torch.nn.utils.clip_grad_norm_ over the reference's parameters or
    the engine optimizer's clip_grad_norm_; None skips clipping. The RNG is reset first
    (GPT-2 has dropout), so both runs draw the same masks.
    """
    torch.manual_seed(seed)
    losses, norms = [], []
    steps = len(microbatches) // accum
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        for mb in range(accum):
            out = module(**make_kwargs(microbatches[step * accum + mb]))
            loss = out.loss if loss_of is None else loss_of(out)
            loss.backward()
            losses.append(loss.detach().clone())
        if clip is not None:
            norms.append(clip(1.0).detach().clone())
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
    return losses, norms


def torch_clip(model):
    params = [p for p in model.parameters() if p.requires_grad]
    return lambda max_norm: torch.nn.utils.clip_grad_norm_(params, max_norm)


def assert_bitwise(a, b, what):
    assert len(a) == len(b), f"{what}: {len(a)} vs {len(b)} values"
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"{what}[{i}] differs: {x!r} vs {y!r} (diff {(x - y).abs().max()})"


def assert_state_bitwise(ref_sd, got_sd):
    assert set(ref_sd) == set(got_sd), f"keys differ: {set(ref_sd) ^ set(got_sd)}"
    bad = []
    for key, value in ref_sd.items():
        got = got_sd[key]
        if value.dtype != got.dtype or value.shape != got.shape or not torch.equal(value, got):
            diff = (value.double() - got.double()).abs().max().item() if value.shape == got.shape else None
            bad.append(f"{key} (dtype {value.dtype}/{got.dtype}, max diff {diff})")
    assert not bad, f"{len(bad)} of {len(ref_sd)} tensors differ: {bad[:6]}"


@pytest.fixture
def tf():
    """Helpers of the engine tests, as one namespace."""
    return types.SimpleNamespace(
        VOCAB=VOCAB, SMALL_UNITS=SMALL_UNITS, MIX_BUDGETS=MIX_BUDGETS, make_tiny=make_tiny,
        make_batches=make_batches, lm_batch=lm_batch, train=train, torch_clip=torch_clip,
        assert_bitwise=assert_bitwise, assert_state_bitwise=assert_state_bitwise, copy=copy.deepcopy)


@pytest.fixture
def engines():
    """Collects engines and closes them at the end of the test (threads, spill files)."""
    made = []
    yield made
    for engine in made:
        try:
            engine.close()
        except Exception:
            pass


@pytest.fixture
def spill_io(monkeypatch):
    """Counts the NVMe stores opened and the writes of state to them (`NvmeStore.write_async`,
    the one way state reaches a spill file). A spill file's name is unlinked as soon as it is
    opened, so looking for files in the directory proves nothing."""
    from tierflow.memory import nvme as nvme_module
    seen = {"stores": 0, "writes": 0}
    real_init, real_write = nvme_module.NvmeStore.__init__, nvme_module.NvmeStore.write_async

    def init(self, *args, **kwargs):
        seen["stores"] += 1
        real_init(self, *args, **kwargs)

    def write_async(self, *args, **kwargs):
        seen["writes"] += 1
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(nvme_module.NvmeStore, "__init__", init)
    monkeypatch.setattr(nvme_module.NvmeStore, "write_async", write_async)
    return seen


def open_files_under(path) -> list[str]:
    """Files under `path` this process still holds open (unlinked ones included: /proc/self/fd
    names them '... (deleted)'): a store closed on an error leaves none."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(path)):
            held.append(target)
    return held


def cli_train_flags(tmp_path, *extra: str) -> list:
    """`tierflow train` arguments for a fast CLI run: llama-tiny on a small text file, budgets
    small enough that state spills to an NVMe directory under `tmp_path`."""
    data = tmp_path / "data.txt"
    data.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(400)))
    return ["train", "--model", "llama-tiny", "--data", str(data), "--steps", "4", "--seq-len", "32",
            "--log-every", "0", "--device", "cpu", "--device-memory", "3MiB", "--host-memory", "4MiB",
            "--nvme", str(tmp_path / "spill"), "--warmup", "0", *extra]
