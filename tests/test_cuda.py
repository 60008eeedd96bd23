"""GPU paths (side stream, pinned host state, device-side AdamW): run only where CUDA exists.

Compared with plain PyTorch on the same GPU within a tolerance: GPU reductions in
backward (embedding gradients use atomics) are not bitwise reproducible.
"""
import copy

import pytest
import torch

import tierflow

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _tiny_llama():
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def _train(model, opt, clip, batches):
    losses = []
    for ids in batches:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        clip()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    return losses


@pytest.mark.parametrize("update_on", ["cpu", "device"])
@pytest.mark.parametrize("placement", ["device", "host", "nvme", "auto"])
def test_cuda_matches_torch(tmp_path, placement, update_on):
    model = _tiny_llama()
    ref = copy.deepcopy(model).cuda()
    batches = [torch.randint(0, 96, (2, 16), device="cuda") for _ in range(5)]
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, fused=True)
    expected = _train(ref, ref_opt, lambda: torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0), batches)
    kwargs = dict(placement=placement) if placement != "auto" else dict(
        device_memory="512KiB", host_memory="2MiB", unit_bytes="32KiB", activations="autograd")
    engine = tierflow.offload(model, device="cuda", nvme=tmp_path, update_on=update_on, **kwargs)
    opt = tierflow.AdamW(engine, lr=1e-3)
    got = _train(engine, opt, lambda: opt.clip_grad_norm_(1.0), batches)
    if update_on == "device" and placement in ("host", "nvme"):  # AdamW ran on the GPU: counted copies
        assert engine.io_stats()["host_to_device"] > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    state, ref_state = engine.state_dict(), ref.state_dict()
    for key in ref_state:
        torch.testing.assert_close(state[key].cuda(), ref_state[key], rtol=1e-4, atol=1e-5)
    peak, cap = engine.budget_peaks()["device"]
    assert cap is None or peak <= cap
    engine.close()


@pytest.mark.parametrize("update_on", ["cpu", "device"])
def test_cuda_bf16_trains(tmp_path, update_on):
    engine = tierflow.offload(_tiny_llama(), device="cuda", dtype=torch.bfloat16, device_memory="512KiB",
                              activations="autograd",
                              host_memory="2MiB", nvme=tmp_path, unit_bytes="32KiB", update_on=update_on)
    opt = tierflow.AdamW(engine, lr=1e-2)
    ids = torch.randint(0, 96, (2, 16))
    losses = _train(engine, opt, lambda: opt.clip_grad_norm_(1.0), [ids] * 6)
    assert losses[-1] < losses[0]
    engine.close()


@pytest.mark.parametrize("placement", ["device", "host"])
def test_recording_a_step_does_not_wait_for_a_lagging_gpu(tmp_path, placement):
    """docs/engine.md: nothing blocks the host when the step is recorded. With 1 s of sleep queued
    on the GPU after a backward, clip + opt.step() return long before the GPU is done (a blocking
    copy in a device-side update, e.g. torch.tensor(step, device=cuda), made them wait for it)."""
    import time

    from tierflow.bench.gpu import cycles_per_ms

    engine = tierflow.offload(_tiny_llama(), device="cuda", placement=placement, nvme=tmp_path,
                              update_on="device")
    opt = tierflow.AdamW(engine, lr=1e-3)
    ids = torch.randint(0, 96, (2, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    try:
        for _ in range(2):  # warm-up: the unit order is recorded, the allocator has its blocks
            engine(input_ids=ids, labels=ids).loss.backward()
            opt.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad()
        torch.cuda.synchronize()
        engine(input_ids=ids, labels=ids).loss.backward()
        torch.cuda._sleep(int(1000 * cycles_per_ms()))  # the GPU now lags the host by ~1 s
        start = time.perf_counter()
        opt.clip_grad_norm_(1.0)
        opt.step()
        host_s = time.perf_counter() - start
        torch.cuda.synchronize()
        assert host_s < 0.3, f"recording the step waited {host_s:.2f} s for the GPU"
    finally:
        engine.close()
