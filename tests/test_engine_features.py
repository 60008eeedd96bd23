"""What real models do, against plain PyTorch: frozen and unused parameters, buffers, a module
called several times per step, a parameter used outside its own module's forward, gradient
accumulation without clipping, eval forward, mixed precision, and a forward path that
changes between steps (trace re-recording). Small units and small budgets throughout, so
parameters really stream in and out of the device budget."""
from __future__ import annotations

import types

import pytest

import torch
import torch.nn.functional as F
from torch import nn

import tierflow

from conftest import (MIX_BUDGETS, SMALL_UNITS, assert_bitwise, assert_state_bitwise, make_batches,
                      make_tiny, torch_clip, train)

LR, WD = 1e-2, 0.01
V, D = 64, 32


def xy(ids, **extra):
    return {"x": ids[:, :-1], "y": ids[:, 1:], **extra}


def lm_loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


class Block(nn.Module):
    def __init__(self, d=D):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, h):
        return torch.tanh(self.lin(h)) + h


class TinyNet(nn.Module):
    """Embedding, a stack of residual blocks, a head; options add the features under test."""

    def __init__(self, layers=4, d=D, vocab=V, seed=0):
        torch.manual_seed(seed)
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def body(self, h, **kwargs):
        for block in self.blocks:
            h = block(h)
        return h

    def forward(self, x, y=None, **kwargs):
        h = self.body(self.emb(x), **kwargs)
        logits = self.head(h)
        return types.SimpleNamespace(logits=logits, loss=None if y is None else lm_loss(logits, y))


def run_pair(make_model, tmp_path, engines, *, steps=5, accum=2, clip=True, make_kwargs=xy, vocab=V,
             offload_kw=None, batches=None, check=True):
    """Train a reference and an offloaded copy of the same model; assert bitwise equality.
    Returns (reference model, engine, optimizer, losses)."""
    batches = batches or make_batches(steps * accum, vocab=vocab, seq=17)
    ref = make_model()
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=LR, weight_decay=WD,
                                fused=True)
    ref_losses, ref_norms = train(ref, ref_opt, torch_clip(ref) if clip else None, batches, accum,
                                  make_kwargs=make_kwargs)
    model = make_model()
    # Host homes streamed through a tight device budget (as on a GPU: host_in_place=False).
    kw = dict(SMALL_UNITS, nvme=tmp_path / "spill", placement="host", device_memory="96KiB", host_in_place=False)
    kw.update(offload_kw or {})
    engine = tierflow.offload(model, **kw)
    engines.append(engine)
    opt = tierflow.AdamW(engine, lr=LR, weight_decay=WD)
    losses, norms = train(engine, opt, opt.clip_grad_norm_ if clip else None, batches, accum,
                          make_kwargs=make_kwargs)
    if check:
        assert_bitwise(ref_losses, losses, "loss")
        assert_bitwise(ref_norms, norms, "grad norm")
        assert_state_bitwise(ref.state_dict(), engine.state_dict())
    return ref, engine, opt, losses


# ---------------------------------------------------------------------------- frozen parameters

def test_frozen_parameters_get_no_state_and_stay_unchanged(tmp_path, engines):
    frozen = ["model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight"]

    def make():
        model = make_tiny("llama")
        for name, p in model.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
        return model

    initial = make().state_dict()
    ref, engine, opt, _ = run_pair(make, tmp_path, engines, make_kwargs=lambda ids: {"input_ids": ids, "labels": ids},
                                   vocab=96, offload_kw=dict(MIX_BUDGETS, placement="auto"))
    sd = engine.state_dict()
    for name in frozen:
        assert torch.equal(sd[name], initial[name]), f"frozen {name} changed"
    assert not torch.equal(sd["model.layers.1.mlp.down_proj.weight"], initial["model.layers.1.mlp.down_proj.weight"])
    state = engine.optimizer_state()
    assert not set(frozen) & set(state), "frozen parameters must get no optimizer state"
    assert {n for n, p in ref.named_parameters() if p.requires_grad} == set(state)
    # ... and no gradient or moment arrays in their tiers.
    uid = engine.param_owner[id(engine.module.model.embed_tokens.weight)]
    assert not {"grad", "exp_avg", "exp_avg_sq"} & set(engine.states[uid].arrays)
    assert all(p not in {q for g in opt.param_groups for q in g["params"]}
               for n, p in engine.module.named_parameters() if n in frozen)


# ---------------------------------------------------------------------------- buffers

class Scaled(nn.Module):
    def __init__(self, i, d=D):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, d) * (1 + i / 4))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))       # mutated in forward
        self.register_buffer("shift", torch.full((d,), 0.01 * i), persistent=False)

    def forward(self, h):
        if self.training:
            self.calls += 1
        return torch.tanh(self.lin(h) * self.scale + self.shift) + h


class BufferNet(TinyNet):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Scaled(i) for i in range(4))
        self.register_buffer("temperature", torch.tensor(1.5))

    def forward(self, x, y=None):
        out = super().forward(x, y)
        out.logits = out.logits / self.temperature
        out.loss = lm_loss(out.logits, y)
        return out


def test_buffers_used_in_forward(tmp_path, engines):
    ref, engine, _, _ = run_pair(BufferNet, tmp_path, engines)
    sd = engine.state_dict()
    assert int(sd["blocks.0.calls"]) == 10 and "blocks.0.shift" not in sd
    assert engine.io_stats()["host_to_device"] > 0


# ---------------------------------------------------------------------------- called several times

class RepeatNet(TinyNet):
    """The same Linear applied three times per forward, with other layers in between."""

    def body(self, h):
        shared = self.blocks[0].lin
        for i in range(3):
            h = torch.tanh(shared(h)) + h
            h = self.blocks[1 + i](h)
        return h


def test_module_called_several_times_per_step(tmp_path, engines):
    _, engine, _, _ = run_pair(RepeatNet, tmp_path, engines)
    assert engine.io_stats()["host_to_device"] > 0


# ---------------------------------------------------------------------------- parameter used outside its module

class OutsideNet(nn.Module):
    """Output projection tied to the embedding, applied in the parent's forward as
    F.linear(h, self.emb.weight): the embedding's unit is used outside its own module."""

    def __init__(self, layers=6, d=64, vocab=128):
        torch.manual_seed(0)
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.probe = None

    def forward(self, x, y=None):
        h = self.emb(x)
        for block in self.blocks:
            h = block(h)
        if self.probe is not None:
            self.probe()
        logits = F.linear(h, self.emb.weight)
        return types.SimpleNamespace(logits=logits, loss=lm_loss(logits, y))


def test_parameter_used_outside_its_module(tmp_path, engines):
    resident_at_use = []

    def make():
        return OutsideNet()

    def kwargs(ids):
        return xy(ids)

    # Reference first, then the engine with a probe that records whether the embedding's
    # unit was on the device right before F.linear used it.
    batches = make_batches(10, vocab=128, seq=17)
    ref = make()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=WD, fused=True)
    ref_losses, ref_norms = train(ref, ref_opt, torch_clip(ref), batches, 2, make_kwargs=kwargs)

    model = make()
    engine = tierflow.offload(model, **SMALL_UNITS, placement="host", device_memory="128KiB", host_in_place=False)
    engines.append(engine)
    uid = engine.param_owner[id(model.emb.weight)]
    assert len(engine.units) == 7 and engine.units[uid].name == "emb"
    model.probe = lambda: resident_at_use.append(engine.residency[uid].flat is not None)
    opt = tierflow.AdamW(engine, lr=LR, weight_decay=WD)
    losses, norms = train(engine, opt, opt.clip_grad_norm_, batches, 2, make_kwargs=kwargs)
    assert len(resident_at_use) == 10
    assert not all(resident_at_use), "the embedding must have been evicted before its use in the parent"
    assert_bitwise(ref_losses, losses, "loss")
    assert_bitwise(ref_norms, norms, "grad norm")
    assert_state_bitwise(ref.state_dict(), engine.state_dict())
    peak, cap = engine.budget_peaks()["device"]
    assert peak <= cap


# ---------------------------------------------------------------------------- unused parameters

class UnusedNet(TinyNet):
    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(D, D)            # never called
        self.spare = nn.Parameter(torch.randn(D))  # a direct parameter of the root, never read


def test_unused_parameters_get_no_grad_and_no_update(tmp_path, engines):
    initial = UnusedNet().state_dict()
    ref, engine, _, _ = run_pair(UnusedNet, tmp_path, engines)
    assert ref.unused.weight.grad is None
    sd = engine.state_dict()
    for name in ("unused.weight", "unused.bias", "spare"):
        assert torch.equal(sd[name], initial[name]), f"{name} must not change (no grad, no weight decay)"
    state = engine.optimizer_state()
    assert "unused.weight" not in state and "spare" not in state and "head.weight" in state


# ---------------------------------------------------------------------------- accumulation without clipping

def test_gradient_accumulation_3_without_clipping(tmp_path, engines):
    run_pair(lambda: make_tiny("llama"), tmp_path, engines, steps=4, accum=3, clip=False,
             make_kwargs=lambda ids: {"input_ids": ids, "labels": ids}, vocab=96,
             offload_kw=dict(MIX_BUDGETS, placement="auto"))


# ---------------------------------------------------------------------------- eval forward

def test_eval_no_grad_forward_equals_plain_model(tmp_path, engines):
    batches = make_batches(4)
    ref = make_tiny("gpt2")
    model = make_tiny("gpt2")
    engine = tierflow.offload(model, **SMALL_UNITS, **MIX_BUDGETS, nvme=tmp_path / "spill")
    engines.append(engine)
    assert set(engine.plan.homes) == {"device", "host", "nvme"}

    def logits(module):
        module.eval()
        with torch.no_grad():
            out = [module(input_ids=ids).logits for ids in batches]
        module.train()
        return out

    assert_bitwise(logits(ref), logits(engine), "eval logits before training")
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=WD, fused=True)
    opt = tierflow.AdamW(engine, lr=LR, weight_decay=WD)
    ref_losses, _ = train(ref, ref_opt, torch_clip(ref), batches, 2)
    losses, _ = train(engine, opt, opt.clip_grad_norm_, batches, 2)
    assert_bitwise(ref_losses, losses, "loss")
    assert_bitwise(logits(ref), logits(engine), "eval logits after training")
    # Dropout is back on in train mode (same masks as torch from the same seed).
    torch.manual_seed(5)
    a = ref(input_ids=batches[0], labels=batches[0]).loss
    torch.manual_seed(5)
    b = engine(input_ids=batches[0], labels=batches[0]).loss
    assert torch.equal(a, b)
    b.backward()
    opt.zero_grad()


# ---------------------------------------------------------------------------- mixed precision

def test_bf16_compute_with_fp32_masters(tmp_path, engines):
    batches = make_batches(2) * 5  # the same two micro-batches: the loss must fall
    ref = make_tiny("llama")
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=WD, fused=True)
    ref_losses, _ = train(ref, ref_opt, torch_clip(ref), batches, 2)

    runs = {}
    for dtype in (None, torch.bfloat16):
        model = make_tiny("llama")
        engine = tierflow.offload(model, **SMALL_UNITS, placement="host", dtype=dtype, host_in_place=False)
        engines.append(engine)
        opt = tierflow.AdamW(engine, lr=LR, weight_decay=WD)
        losses, norms = train(engine, opt, opt.clip_grad_norm_, batches, 2)
        runs[dtype] = (engine, losses, engine.state_dict())  # state_dict(): all transfers done
    assert_bitwise(ref_losses, runs[None][1], "fp32 loss")


    engine, losses, sd = runs[torch.bfloat16]
    losses = torch.stack(losses)
    assert torch.isfinite(losses).all()
    # bf16 weights: 8 bits of mantissa, so the first loss agrees with fp32 to ~1%.
    torch.testing.assert_close(losses[0], ref_losses[0], rtol=2e-2, atol=0)
    # ... and training follows the fp32 trajectory within 5%.
    torch.testing.assert_close(losses, torch.stack(ref_losses), rtol=5e-2, atol=0)
    assert losses[-1] < 0.8 * losses[0], f"bf16 run must train: {losses.tolist()}"
    assert not torch.equal(losses, torch.stack(ref_losses)), "bf16 compute must actually differ from fp32"
    assert all(v.dtype == torch.float32 for v in sd.values()), "master weights must stay fp32"
    assert {v.dtype for k, v in engine.module.state_dict().items()} <= {torch.bfloat16, torch.float32}
    # fp32 masters are not bf16-rounded: some weight must differ from its bf16 rounding.
    w = sd["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(w, w.bfloat16().float())
    fp32_h2d = runs[None][0].io_stats()["host_to_device"]
    bf16_h2d = engine.io_stats()["host_to_device"]
    assert fp32_h2d > 0 and 0.45 <= bf16_h2d / fp32_h2d <= 0.55, (bf16_h2d, fp32_h2d)

    # Computed in place (a CPU's default): the compute-dtype copy in host memory is what the
    # model reads, rewritten by every update; the same losses as the streamed run, no copies.
    model = make_tiny("llama")
    in_place = tierflow.offload(model, **SMALL_UNITS, placement="host", dtype=torch.bfloat16)
    engines.append(in_place)
    opt = tierflow.AdamW(in_place, lr=LR, weight_decay=WD)
    in_place_losses, _ = train(in_place, opt, opt.clip_grad_norm_, batches, 2)
    assert all(in_place.plan.in_place) and in_place.io_stats()["host_to_device"] == 0
    assert_bitwise(runs[torch.bfloat16][1], in_place_losses, "bf16 loss, in place vs streamed")
    assert_state_bitwise(sd, in_place.state_dict())


# ---------------------------------------------------------------------------- changing forward path

class SkipNet(TinyNet):
    """Skips block 2 when asked: the recorded module order changes every other step."""

    def body(self, h, skip=False):
        for i, block in enumerate(self.blocks):
            if not (skip and i == 2):
                h = block(h)
        return h


def test_trace_rerecorded_when_forward_path_changes(tmp_path, engines):
    step_of = {"n": 0}

    def kwargs(ids):
        step_of["n"] += 1
        return xy(ids, skip=((step_of["n"] - 1) // 2) % 2 == 1)  # 2 micro-batches per step

    ref, engine, _, _ = run_pair(SkipNet, tmp_path, engines, steps=6, make_kwargs=kwargs,
                                 offload_kw=dict(placement="auto", device_memory="112KiB",
                                                 host_memory="512KiB"))
    assert set(engine.plan.homes) >= {"host", "nvme"}
    assert engine.trace.changes >= 4, f"the trace must be re-recorded, changes={engine.trace.changes}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype,staging", [(torch.float32, 5), (torch.bfloat16, 5), (torch.bfloat16, 8)])
def test_nvme_updates_of_many_windows_with_few_staging_buffers(tmp_path, engines, dtype, staging):
    """An AdamW update of NVMe state in several windows reads the next window ahead only when
    the staging pool can hold both (4 arrays each, + the compute-dtype weights): with fewer
    buffers it used to wait forever for a buffer its own read-ahead held."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(128, 128, bias=False) for _ in range(3)])
    engine = tierflow.offload(model, placement="nvme", nvme=tmp_path, dtype=dtype, unit_bytes=128 * 128 * 4,
                              chunk_bytes="16KiB", staging_buffers=staging)
    engines.append(engine)
    opt = tierflow.AdamW(engine, lr=1e-2)
    x = torch.randn(8, 128)
    losses = []
    for _ in range(3):
        loss = engine(x.to(dtype)).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    engine.flush()
    assert losses[-1] < losses[0] and engine.io_stats()["nvme_written"] > 0
