"""tierflow's AdamW equals torch.optim.AdamW bit for bit; the optim and transfer benchmarks run."""
from __future__ import annotations

import sys

import pytest
import torch

import tierflow
from tierflow.runtime.updates import HyperParams, PendingUpdate, adamw_

SIZES = (1, 7, 1001, 4099)      # odd sizes: vector tails and remainders of the kernels
LRS = (1e-2, 3e-3, 0.0, 5e-2)   # changed between steps (0.0: weight decay and update vanish)
SCALES = (None, 0.37, None, 0.81)  # clip coefficients multiplied into the gradient
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.99)
EPS = 1e-8


def _tensors(seed: int):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen) for n in SIZES]
    grads = [[torch.randn(n, generator=gen) for n in SIZES] for _ in LRS]
    return params, grads


def _windows(numel: int, window: int | None):
    """[start, stop) pieces of a flat array, like the engine's staging-buffer windows."""
    window = window or numel
    return [(s, min(s + window, numel)) for s in range(0, numel, window)]


def _tierflow_run(fused: bool, window: int | None, seed: int = 0) -> list[torch.Tensor]:
    """Every step through adamw_, window by window; returns master, exp_avg, exp_avg_sq."""
    params, grads = _tensors(seed)
    masters = [p.clone() for p in params]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    for step, (lr, scale) in enumerate(zip(LRS, SCALES), start=1):
        hp = HyperParams(lr, BETAS[0], BETAS[1], EPS, WEIGHT_DECAY, fused)
        grad_scale = None if scale is None else torch.tensor(scale)
        update = PendingUpdate(slot=None, hp=hp, step=step, grad_scale=grad_scale)
        for master, grad, (m, v) in zip(masters, grads[step - 1], moments):
            grad = grad.clone()
            for start, stop in _windows(master.numel(), window):
                adamw_(master[start:stop], grad[start:stop], m[start:stop], v[start:stop], update)
    return masters + [t for pair in moments for t in pair]


def _torch_run(fused: bool, seed: int = 0) -> list[torch.Tensor]:
    """The same steps through torch.optim.AdamW (fused=True, or its default), clipping the
    gradients by `scale` as clip_grad_norm_ does and changing lr between steps."""
    params, grads = _tensors(seed)
    params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(params, lr=LRS[0], betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                            **({"fused": True} if fused else {}))
    for step, (lr, scale) in enumerate(zip(LRS, SCALES), start=1):
        opt.param_groups[0]["lr"] = lr
        for p, g in zip(params, grads[step - 1]):
            p.grad = g.clone()
            if scale is not None:
                p.grad.mul_(torch.tensor(scale))
        opt.step()
    states = [opt.state[p] for p in params]
    return ([p.detach() for p in params] + [t for s in states for t in (s["exp_avg"], s["exp_avg_sq"])])


def _assert_bitwise(got, want):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), f"tensor {i} differs by up to {(a - b).abs().max().item():.3g}"


@pytest.mark.parametrize("window", [None, 64, 1000], ids=["whole", "window64", "window1000"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "single-tensor"])
def test_adamw_equals_torch_bitwise(fused, window):
    _assert_bitwise(_tierflow_run(fused, window), _torch_run(fused))


def test_adamw_grad_scale_is_applied_in_place():
    grad = torch.ones(5)
    hp = HyperParams(1e-3, 0.9, 0.999, 1e-8, 0.0, True)
    adamw_(torch.zeros(5), grad, torch.zeros(5), torch.zeros(5),
           PendingUpdate(slot=None, hp=hp, step=1, grad_scale=torch.tensor(0.5)))
    assert torch.equal(grad, torch.full((5,), 0.5))


# ---- tierflow.AdamW on an engine --------------------------------------------------------

def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _batches(n: int):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 7, generator=gen), torch.randn(4, 3, generator=gen)) for _ in range(n)]


def _train(module, opt, clip, lrs):
    for lr, (x, y) in zip(lrs, _batches(len(lrs))):
        opt.param_groups[0]["lr"] = lr
        torch.nn.functional.mse_loss(module(x), y).backward()
        clip()
        opt.step()
        opt.zero_grad()


def test_engine_adamw_is_a_torch_optimizer_and_sees_lr_changes():
    ref_model = _tiny_model()
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=WEIGHT_DECAY, fused=True)
    engine = tierflow.offload(_tiny_model(), placement="host")
    try:
        opt = tierflow.AdamW(engine, lr=1e-2, weight_decay=WEIGHT_DECAY)
        assert isinstance(opt, torch.optim.Optimizer)
        lrs = [1e-2, 5e-2, 2e-3, 3e-2]
        _train(ref_model, ref_opt, lambda: torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.5), lrs)
        _train(engine, opt, lambda: opt.clip_grad_norm_(0.5), lrs)
        want = ref_model.state_dict()
        got = engine.state_dict()
        assert set(got) == set(want)
        _assert_bitwise([got[k] for k in want], list(want.values()))

        # lr = 0 set on the group: the next step changes nothing (weight decay is lr-scaled too).
        before = engine.state_dict()
        _train(engine, opt, lambda: None, [0.0])
        after = engine.state_dict()
        _assert_bitwise([after[k] for k in before], list(before.values()))
    finally:
        engine.close()


# ---- benchmarks -------------------------------------------------------------------------

def test_optim_bench_smoke(monkeypatch, tmp_path, capsys):
    from tierflow.bench.optim import run_optim_bench

    # DeepSpeed unavailable: a row without reference. Its submodules too, in case an earlier
    # test imported them (accelerate does when DeepSpeed is installed).
    for name in ["deepspeed"] + [n for n in sys.modules if n.startswith("deepspeed.")]:
        monkeypatch.setitem(sys.modules, name, None)
    path = tmp_path / "optim.json"
    rows = run_optim_bench(numel=1_000_000, repeats=1, json_path=path)
    assert rows and path.exists()
    for r in rows:
        assert set(r) == {"name", "tierflow", "reference", "ratio", "unit"}
        assert r["tierflow"] > 0
    deepspeed = [r for r in rows if "deepspeed" in r["name"]]
    assert len(deepspeed) == 1 and deepspeed[0]["reference"] is None
    assert "DeepSpeed CPUAdam not measured" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_transfer_bench_without_cuda_is_skipped(capsys):
    from tierflow.bench.transfer import run_transfer_bench

    assert run_transfer_bench(nbytes=1 << 20) == []
    assert "no CUDA device: skipped" in capsys.readouterr().out


# ---- one fused call per run of contiguous parameters (updates.update_runs) -------------------

def _pending(slots, fused=True, steps=None, scales=None):
    from tierflow.core.layout import Slot

    hp = HyperParams(1e-3, 0.9, 0.999, 1e-8, 0.0, fused)
    scale = torch.tensor(0.5)
    out = []
    for i, (offset, numel) in enumerate(slots):
        slot = Slot(f"p{i}", None, (numel,), numel, offset, True)
        out.append(PendingUpdate(slot, hp, (steps or {}).get(i, 1), (scales or {}).get(i, scale)))
    return out


def test_update_runs_join_contiguous_parameters_without_scalar_tails():
    from tierflow.runtime.updates import update_runs

    # offsets as the layout pads them (2048 elements): 4096 / 64 / 37 (tail) / 2048 / 100 (tail)
    pending = _pending([(0, 4096), (4096, 64), (6144, 37), (8192, 2048), (10240, 100)])
    runs = [(start, numel) for start, numel, _ in update_runs(list(reversed(pending)))]
    # a tail ends its run (its last elements stay on the kernel's scalar path)
    assert runs == [(0, 6144 + 37), (8192, 2048 + 100)]
    # a parameter that is not pending (a gap of a whole segment) splits the run
    assert [r[:2] for r in update_runs(_pending([(0, 2048), (4096, 2048)]))] == [(0, 2048), (4096, 2048)]
    # different steps or clip coefficients, or the unfused arithmetic: one call each
    assert len(update_runs(_pending([(0, 2048), (2048, 2048)], steps={1: 2}))) == 2
    assert len(update_runs(_pending([(0, 2048), (2048, 2048)], scales={1: torch.tensor(0.5)}))) == 2
    assert len(update_runs(_pending([(0, 2048), (2048, 2048)], fused=False))) == 2


@pytest.mark.parametrize("placement", ["device", "host", "nvme"])
def test_fused_runs_over_parameters_with_tails_bitwise_equal_to_torch(placement, tmp_path):
    """Parameters with and without vector tails (37, 185 elements...) in one unit: the joined
    fused calls must give torch's per-parameter fused AdamW bit for bit, clipping included."""
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.Tanh(), torch.nn.Linear(64, 37),
                                   torch.nn.Tanh(), torch.nn.Linear(37, 5), torch.nn.Linear(5, 64))

    def run(model, opt, clip):
        gen = torch.Generator().manual_seed(3)
        for _ in range(4):
            loss = model(torch.randn(8, 96, generator=gen)).pow(2).mean() * 100
            loss.backward()
            clip()
            opt.step()
            opt.zero_grad()

    ref = build()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.01, fused=True)
    run(ref, ref_opt, lambda: torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1))
    engine = tierflow.offload(build(), placement=placement, nvme=tmp_path / "spill", chunk_bytes="32KiB")
    try:
        opt = tierflow.AdamW(engine, lr=1e-2, weight_decay=0.01)
        run(engine, opt, lambda: opt.clip_grad_norm_(0.1))
        got = engine.state_dict()
        for name, value in ref.state_dict().items():
            assert torch.equal(got[name], value), name
        moments = engine.optimizer_state()
        for name, param in ref.named_parameters():
            assert torch.equal(moments[name]["exp_avg_sq"], ref_opt.state[param]["exp_avg_sq"]), name
    finally:
        engine.close()
