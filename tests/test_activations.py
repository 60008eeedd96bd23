"""Activation modes (keep, recompute, offload, auto): exact against plain PyTorch, and within
the device budget where keeping every activation is not."""
from __future__ import annotations

import pytest
import torch

import tierflow
from tierflow.core.activation_policy import LayerStats, choose
from tierflow.errors import BudgetError, ConfigError  # noqa: F401

from conftest import SMALL_UNITS, assert_bitwise, assert_state_bitwise, make_batches, make_tiny, torch_clip, train

STEPS, LR = 3, 1e-2
MODES = ["keep", "recompute", "offload", "auto"]


def _reference(arch, batches):
    model = make_tiny(arch)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
    losses, norms = train(model, opt, torch_clip(model), batches, 1)
    grads = None
    return losses, norms, model.state_dict(), grads


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", MODES)
def test_modes_bitwise_equal_to_torch(arch, mode, tmp_path, engines):
    """Dropout is on in GPT-2 (same seed): recomputation must replay the same masks."""
    batches = make_batches(STEPS)
    ref_losses, ref_norms, ref_sd, _ = _reference(arch, batches)
    model = make_tiny(arch)
    model.train()
    engine = tierflow.offload(model, nvme=tmp_path, activations=mode, host_memory="16MiB",
                              device_memory="2MiB" if mode == "auto" else None, **SMALL_UNITS)
    engines.append(engine)
    opt = tierflow.AdamW(engine, lr=LR)
    losses, norms = train(engine, opt, opt.clip_grad_norm_, batches, 1)
    assert_bitwise(ref_losses, losses, "loss")
    assert_bitwise(ref_norms, norms, "grad norm")
    assert_state_bitwise(ref_sd, engine.state_dict())
    report = engine.activations.report()
    assert len(report["layers"]) == 2
    if mode in ("keep", "recompute", "offload"):
        assert set(report["layers"]) == {mode}
    if mode == "offload":
        assert engine.io_stats()["device_to_host"] > 0
    assert engine.budgets["device"].used == engine.plan.tier_bytes["device"] + _buffer_bytes(model) \
        + _cached(engine), "every activation's bytes must be released after backward"


def _buffer_bytes(model):
    return sum(b.numel() * b.element_size() for b in model.buffers())


def _cached(engine):
    from tierflow.core.plan import working_bytes
    cached = sum(working_bytes(engine.units[u], engine.compute_dtype) for u, r in enumerate(engine.residency)
                 if r.flat is not None and not engine.residency.is_permanent(u))
    spares = sum(t.numel() * t.element_size() for group in engine.residency.spares.by_size.values() for t in group)
    return cached + spares  # evicted buffers kept for reuse stay in the device budget


def test_bad_mode_is_rejected():
    with pytest.raises(ConfigError, match="activations"):
        tierflow.offload(make_tiny("llama"), activations="sometimes")


def test_policy_keeps_last_layers_and_offloads_or_recomputes_the_rest():
    stats = [LayerStats(saved_bytes=100, input_bytes=10, seconds=1.0) for _ in range(4)]
    outside = LayerStats(saved_bytes=20)
    assert set(choose(stats, outside, 1000, 1e9, 1e9).layers) == {"keep"}
    policy = choose(stats, outside, 200 + 20 + 100, 1e9, 1e9)  # transient 200 + outside + one layer
    assert policy.layers == ("offload", "offload", "offload", "keep")
    slow_copy = choose(stats, outside, 200 + 20 + 100, 1e9, 10.0)
    assert slow_copy.layers[:3] == ("recompute",) * 3
    no_host = choose(stats, outside, 200 + 20 + 100, 0, 1e9)
    assert no_host.layers[0] == "recompute"


def _long_llama():
    import warnings

    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   use_cache=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_config(cfg)


def test_auto_trains_a_length_that_keep_cannot_within_the_device_budget(tmp_path, engines):
    """Batch 1x512: the four layers save ~10 MiB of activations; the device budget is 6 MiB."""
    budget = dict(device_memory="6MiB", host_memory="64MiB", unit_bytes="64KiB")
    batches = make_batches(STEPS, batch=1, seq=512)
    keep = tierflow.offload(_long_llama(), activations="keep", **budget)
    engines.append(keep)
    with pytest.raises(BudgetError, match="activations"):
        keep(input_ids=batches[0], labels=batches[0]).loss.backward()

    ref = _long_llama()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, fused=True)
    ref_losses, ref_norms = train(ref, ref_opt, torch_clip(ref), batches, 1)
    engine = tierflow.offload(_long_llama(), activations="auto", nvme=tmp_path, **budget)
    engines.append(engine)
    opt = tierflow.AdamW(engine, lr=LR)
    losses, norms = train(engine, opt, opt.clip_grad_norm_, batches, 1)
    assert_bitwise(ref_losses, losses, "loss")
    assert_bitwise(ref_norms, norms, "grad norm")
    assert_state_bitwise(ref.state_dict(), engine.state_dict())
    peak, capacity = engine.budget_peaks()["device"]
    assert peak <= capacity
    report = engine.activations.report()
    assert sum(report["saved_bytes"]) > capacity, "keeping every layer must not fit"
    assert set(report["layers"]) - {"keep"}, report


def test_offload_spills_to_nvme_when_host_is_short(tmp_path, engines):
    batches = make_batches(2, batch=1, seq=256)
    ref = _long_llama()
    ref_losses, _ = train(ref, torch.optim.AdamW(ref.parameters(), lr=LR, fused=True), None, batches, 1)
    engine = tierflow.offload(_long_llama(), activations="offload", nvme=tmp_path, host_memory="256KiB",
                              chunk_bytes="16KiB", unit_bytes="64KiB")
    engines.append(engine)
    losses, _ = train(engine, tierflow.AdamW(engine, lr=LR), None, batches, 1)
    assert_bitwise(ref_losses, losses, "loss")
    assert engine.activations.spill.bytes_written > 0 and engine.activations.spill.bytes_read > 0
    assert engine.budgets["host"].peak <= engine.budgets["host"].capacity


def _wide_head(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8192))


def test_linear_bigger_than_the_device_budget_runs_in_tiles(engines, tmp_path):
    """The 8192x64 head (2 MiB in fp32) is bigger than the 1 MiB device budget."""
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    target = torch.randint(0, 8192, (4,), generator=torch.Generator().manual_seed(4))
    ref = _wide_head()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, fused=True)
    engine = tierflow.offload(_wide_head(), device_memory="1MiB", host_memory="64MiB")
    engines.append(engine)
    assert engine.tiled == {"2": len(engine.module[2].tiles)} and len(engine.module[2].tiles) > 2
    opt = tierflow.AdamW(engine, lr=LR)

    def losses_of(model, optimizer):
        losses = []
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        return torch.stack(losses)

    ref_losses, got = losses_of(ref, ref_opt), losses_of(engine, opt)
    assert torch.equal(ref_losses[0], got[0]), "the first forward is the same arithmetic"
    torch.testing.assert_close(got, ref_losses, rtol=1e-5, atol=1e-6)
    state = engine.state_dict()
    assert list(state) == list(ref.state_dict())
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5)
    peak, capacity = engine.budget_peaks()["device"]
    assert peak <= capacity
    # The Hugging Face export holds the layer whole, under its own keys.
    from safetensors.torch import load_file
    exported = load_file(engine.save_pretrained(tmp_path / "export") / "model.safetensors")
    assert sorted(exported) == sorted(state)
    for key, value in state.items():
        assert torch.equal(exported[key], value), key


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.drop = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32), torch.nn.Dropout(0.2)

    def forward(self, x):
        return x + self.fc2(self.drop(torch.nn.functional.gelu(self.fc1(x))))


class _Reused(torch.nn.Module):
    """The first block runs twice per forward (shared weights, two sets of activations)."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Block(), _Block()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.blocks[0](x)


@pytest.mark.parametrize("mode", MODES)
def test_module_called_twice_with_dropout(mode, tmp_path, engines):
    x = torch.randn(8, 64, 32, generator=torch.Generator().manual_seed(5))

    def run(model, opt):
        torch.manual_seed(7)
        losses = []
        for _ in range(2):
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        return losses

    torch.manual_seed(0)
    ref = _Reused()
    ref_losses = run(ref, torch.optim.AdamW(ref.parameters(), lr=LR, fused=True))
    torch.manual_seed(0)
    engine = tierflow.offload(_Reused(), activations=mode, nvme=tmp_path, device_memory="4MiB",
                              host_memory="16MiB", unit_bytes="16KiB")
    engines.append(engine)
    assert_bitwise(ref_losses, run(engine, tierflow.AdamW(engine, lr=LR)), "loss")
    assert_state_bitwise(ref.state_dict(), engine.state_dict())


def test_auto_without_anywhere_to_offload_recomputes(engines):
    """No host room and no NVMe: the first step cannot offload (so measures nothing) and
    auto keeps recomputing, still exact."""
    batches = make_batches(STEPS)
    ref_losses, _, ref_sd, _ = _reference("llama", batches)
    engine = tierflow.offload(make_tiny("llama"), activations="auto", host_memory=0, placement="device")
    engines.append(engine)
    opt = tierflow.AdamW(engine, lr=LR)
    losses, _ = train(engine, opt, opt.clip_grad_norm_, batches, 1)
    assert_bitwise(ref_losses, losses, "loss")
    assert_state_bitwise(ref_sd, engine.state_dict())
    assert set(engine.activations.report()["layers"]) == {"recompute"}
