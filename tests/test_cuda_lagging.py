"""tierflow against plain PyTorch on a GPU that lags behind the host (run only where CUDA exists).

The CUDA tests of test_cuda.py use tiny models and read `.item()` every step, so the GPU is
never behind and a missing stream dependency goes unnoticed. Here every decoder block's
forward and every clip start with a sleep kernel (`GpuLag`, LAG_MS each), the model is wide
(hidden 1024, ~55 M parameters, split into ~27 units), and nothing is read back inside the
loop: losses stay on the device until the last step (tierflow.bench.gpu.train_steps).

Both contenders start from the same weights and train on the same batches (2 distinct ones,
repeated, so the loss falls and wrong weights show in it):

* fp32, TF32 off: losses rtol 1e-4; final weights rtol 1e-4 / atol 1e-5 element-wise, a few
  elements excepted (`weight_mismatches`: AdamW's first update is ~lr*sign(grad), and a
  gradient within rounding noise of zero -- embedding backward uses atomics, the engine's
  flat weight buffers may pick other GEMM kernels -- flips it: at most 1e-4 of a tensor's
  elements, each within 4 lr x steps). atol 1e-5 is 1/100 of one step's update (lr 1e-3) and
  1/2000 of the init scale (0.02): far below what a stale weight or a lost update does.
* bf16: tierflow's bf16 weights against torch autocast (fp32 master weights, fused AdamW);
  the arithmetic differs (bf16 residual stream), so losses within 1e-2 relative, weights
  only finite.

TIERFLOW_LAG_TEST_DEVICE=cpu runs the same cases on the CPU (no lag there; slow, minutes):
a way to check the test itself where there is no GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

from tierflow.bench import gpu

DEVICE = os.environ.get("TIERFLOW_LAG_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")

STEPS, LR, LAG_MS = 6, 1e-3, 10.0  # 10 ms x (4 blocks + clip): the host runs ~50 ms per step ahead
BATCH, SEQ_LEN, DISTINCT = 2, 128, 2
UNITS = dict(unit_bytes="16MiB")  # ~27 units (one per attention / MLP projection group), not one
TIGHT = "64MiB"  # device budget: < 1/3 of the fp32 weights (222 MB), units evicted within a pass

CASES = {
    "device": dict(placement="device"),
    "host-cpu": dict(placement="host", update_on="cpu"),
    "host-device": dict(placement="host", update_on="device"),
    "host-shared": dict(placement="host", update_on="auto"),  # CPU and GPU updates at the same time
    "nvme-cpu": dict(placement="nvme", update_on="cpu"),
    "nvme-device": dict(placement="nvme", update_on="device"),
    # (activations left to autograd, as the default was before it became "auto" with a GPU budget)
    "evict-cpu": dict(placement="host", device_memory=TIGHT, update_on="cpu", activations="autograd"),
    "evict-device": dict(placement="host", device_memory=TIGHT, update_on="device", activations="autograd"),
    "act-keep": dict(placement="host", device_memory="128MiB", activations="keep"),  # room for activations
    "act-offload": dict(placement="host", device_memory=TIGHT, activations="offload"),
    "act-recompute": dict(placement="host", device_memory=TIGHT, activations="recompute"),
}
# (every off-device case here keeps its bf16 gradients packed: runtime/gradients.py)
BF16_CASES = ["device", "host-cpu", "host-device", "host-shared", "nvme-cpu", "nvme-device", "evict-device",
              "act-offload", "act-recompute"]

_REFERENCE: dict = {}


@pytest.fixture(scope="module", autouse=True)
def no_tf32():
    """fp32 must be fp32 on both sides: TF32 matmuls would differ by ~1e-3."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="module")
def initial():
    """The initial weights (CPU) and the batches (on the device) every contender uses."""
    model = gpu.build_initial_model(gpu.LAGGING, seed=0, device=DEVICE, max_positions=SEQ_LEN)
    batches = gpu.make_batches(STEPS, BATCH, SEQ_LEN, gpu.LAGGING.vocab, DEVICE, distinct=DISTINCT)
    return model, batches


def reference(initial, dtype):
    """Plain PyTorch on the same lagging GPU, once per dtype."""
    if dtype not in _REFERENCE:
        model, batches = initial
        _REFERENCE[dtype] = gpu.run_torch(model, batches, DEVICE, dtype, LR, lag_ms=LAG_MS,
                                          keep_state=dtype == torch.float32)
        assert all(torch.isfinite(torch.tensor(_REFERENCE[dtype].losses))), _REFERENCE[dtype].losses
    return _REFERENCE[dtype]


def run_case(initial, case, dtype, tmp_path):
    model, batches = initial
    kwargs = dict(UNITS, nvme=tmp_path / "spill", **CASES[case])
    got = gpu.run_tierflow(case, model, batches, DEVICE, dtype, LR, kwargs, lag_ms=LAG_MS,
                           keep_state=True)
    assert_budget_respected(got, kwargs, dtype)
    if case == "host-shared" and DEVICE == "cuda":  # both kinds of update really ran
        assert 0 < got.info["gpu_updates"] < got.info["homes"]["host"], got.info
    return got


def assert_budget_respected(got, kwargs, dtype):
    """The tight budgets must really be tight (else nothing is evicted) and never exceeded."""
    peak, cap = got.info["budget_peaks"]["device"]
    assert cap is None or peak <= cap, f"device budget exceeded: {peak} > {cap}"
    if kwargs.get("device_memory") == TIGHT:
        weight_bytes = sum(v.numel() for v in got.state.values()) * torch.tensor([], dtype=dtype).element_size()
        assert cap < weight_bytes, "the tight budget holds every weight: nothing would be evicted"
        assert got.info["io_per_step"]["host_to_device"] >= weight_bytes, got.info


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_torch_while_gpu_lags(initial, case, tmp_path):
    ref = reference(initial, torch.float32)
    got = run_case(initial, case, torch.float32, tmp_path)
    assert gpu.max_relative_difference(got.losses, ref.losses) <= 1e-4, (got.losses, ref.losses)
    mismatches = gpu.weight_mismatches(ref.state, got.state, rtol=1e-4, atol=1e-5, outlier_fraction=1e-4,
                                       outlier_bound=4 * LR * STEPS)
    assert not mismatches, mismatches[:8]


@pytest.mark.parametrize("case", BF16_CASES)
def test_bf16_matches_torch_autocast_while_gpu_lags(initial, case, tmp_path):
    ref = reference(initial, torch.bfloat16)
    got = run_case(initial, case, torch.bfloat16, tmp_path)
    assert gpu.max_relative_difference(got.losses, ref.losses) <= 1e-2, (got.losses, ref.losses)
    not_finite = [k for k, v in got.state.items() if not torch.isfinite(v).all()]
    assert not not_finite, not_finite[:8]
