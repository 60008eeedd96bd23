"""The GPU checks' own code, on the CPU: `tierflow bench gpu --cpu-smoke` runs the 1 B run's code
path with a tiny model, and must FAIL when a fault is injected (else a PASS on the GPU would
prove nothing). Also the helpers of tests/test_cuda_lagging.py."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tierflow.bench import gpu, gpu_check
from tierflow.cli.main import main

STEPS = 3


def smoke(tmp_path, **kwargs):
    kwargs.setdefault("steps", STEPS)
    return gpu_check.run_gpu_check("cpu-smoke", json_path=tmp_path / "report.json", **kwargs)


def failed(report) -> set[str]:
    return {c["name"] for c in report["criteria"] if not c["passed"]}


def test_cpu_smoke_passes_and_reports_every_figure(tmp_path):
    report = smoke(tmp_path)
    assert report["passed"], gpu_check.format_report(report)
    assert set(report["runs"]) == {"torch", "tierflow-host", "tierflow-nvme"}
    for run in report["runs"].values():
        assert len(run["losses"]) == STEPS and len(run["step_s"]) == STEPS
        assert run["nonfinite_losses"] == 0 and run["total_s"] > 0
    assert report["runs"]["tierflow-nvme"]["info"]["homes"]["nvme"] > 0, "the NVMe contender must spill"
    assert report["runs"]["tierflow-host"]["max_rel_loss_diff"] <= 1e-2
    assert len(report["criteria"]) == 5
    assert json.loads((tmp_path / "report.json").read_text())["passed"] is True
    text = gpu_check.format_report(report)
    assert "OVERALL: PASS" in text and "FAIL" not in text


@pytest.mark.parametrize("fault", ["nan", "diverge"])
def test_injected_fault_fails_the_check(tmp_path, fault):
    report = smoke(tmp_path, contenders=("tierflow-host",), fault=fault)
    assert not report["passed"]
    if fault == "nan":  # the engine itself stops: the skipped step raises NonFiniteError
        assert failed(report) & {"tierflow-host: ran", "tierflow-host: no NaN/inf loss"}
        assert "NonFiniteError" in str(report["runs"]["tierflow-host"].get("error", "")) or \
            "tierflow-host: no NaN/inf loss" in failed(report)
    else:
        assert "tierflow-host: every loss within rtol of torch" in failed(report)
    assert "OVERALL: FAIL" in gpu_check.format_report(report)


def test_a_contender_that_raises_fails_but_the_others_run(tmp_path, monkeypatch):
    budgets = dict(gpu_check.PRESETS["cpu-smoke"]["budgets"], **{"tierflow-host": dict(device_memory="1KiB")})
    monkeypatch.setitem(gpu_check.PRESETS, "cpu-smoke", dict(gpu_check.PRESETS["cpu-smoke"], budgets=budgets))
    report = smoke(tmp_path, steps=1)
    assert failed(report) == {"tierflow-host: ran"}
    assert "error" in report["runs"]["tierflow-host"] and len(report["runs"]["tierflow-nvme"]["losses"]) == 1


def test_cli_exit_status_and_summary_file(tmp_path):
    summary = tmp_path / "summary.txt"
    args = ["bench", "gpu", "--cpu-smoke", "--steps", "2", "--contenders", "tierflow-host", "--summary", str(summary)]
    assert main(args) == 0 and "OVERALL: PASS" in summary.read_text()
    assert main(args + ["--fault", "diverge"]) == 1 and "OVERALL: FAIL" in summary.read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_run_without_cuda_fails_loudly(capsys):
    assert main(["bench", "gpu", "--steps", "1"]) == 1
    assert "no CUDA device" in capsys.readouterr().out


def test_max_relative_difference():
    assert gpu.max_relative_difference([1.0, 2.02], [1.0, 2.0]) == pytest.approx(0.01)
    assert gpu.max_relative_difference([1.0, math.nan], [1.0, 2.0]) == math.inf
    assert gpu.max_relative_difference([1.0], [1.0, 2.0]) == math.inf


def test_weight_mismatches_allow_rare_sign_flips_only():
    torch.manual_seed(0)
    ref = {"w": torch.randn(100, 100) * 0.02, "norm": torch.ones(100)}
    check = dict(rtol=1e-4, atol=1e-5, outlier_fraction=1e-3, outlier_bound=6e-3)
    assert gpu.weight_mismatches(ref, {k: v.clone() for k, v in ref.items()}, **check) == []
    flipped = ref["w"].clone()
    flipped.view(-1)[:5] += 2e-3  # 5 of 10^4 elements: AdamW's first step the other way
    assert gpu.weight_mismatches(ref, dict(ref, w=flipped), **check) == []
    stale = ref["w"] + 1e-3  # every element one update off: a lost or stale update
    assert [p.split(":")[0] for p in gpu.weight_mismatches(ref, dict(ref, w=stale), **check)] == ["w"]
    assert "not finite" in gpu.weight_mismatches(ref, dict(ref, norm=ref["norm"] * math.nan), **check)[0]
    assert "missing" in gpu.weight_mismatches(ref, {"w": ref["w"]}, **check)[0]


def test_helpers_on_the_cpu():
    model = gpu.build_initial_model(gpu.TINY, seed=0, device="cpu", max_positions=64)
    assert len(gpu.decoder_blocks(model)) == gpu.TINY.layers
    lag = gpu.GpuLag(model, 10.0, "cpu")
    assert lag.cycles == 0 and lag._handles == []  # no sleep kernels without CUDA
    lag.sleep()
    batches = gpu.make_batches(5, 2, 8, gpu.TINY.vocab, "cpu", distinct=2)
    assert torch.equal(batches[0], batches[2]) and not torch.equal(batches[0], batches[1])
    same = gpu.build_initial_model(gpu.TINY, seed=0, device="cpu", max_positions=64)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))
    clock = gpu.StepClock("cpu")
    clock.mark(), clock.mark()
    assert len(clock.step_seconds()) == 1
    assert gpu.median_after_warmup([5.0, 5.0, 1.0, 2.0, 3.0]) == 2.0
    with pytest.raises(ValueError):
        gpu.inject_fault(model, "typo")


def test_lagging_test_path_on_the_cpu(tmp_path):
    """The path of tests/test_cuda_lagging.py (final weights kept and compared) on a tiny model:
    on the CPU, fp32, tierflow equals torch, so no weight may be flagged."""
    model = gpu.build_initial_model(gpu.TINY, seed=0, device="cpu", max_positions=64)
    batches = gpu.make_batches(3, 2, 16, gpu.TINY.vocab, "cpu", distinct=2)
    ref = gpu.run_torch(model, batches, "cpu", torch.float32, 1e-3, lag_ms=10.0, keep_state=True)
    got = gpu.run_tierflow("evict", model, batches, "cpu", torch.float32, 1e-3,
                           dict(placement="host", device_memory="192KiB", unit_bytes="16KiB", nvme=tmp_path,
                                host_in_place=False),
                           lag_ms=10.0, keep_state=True)
    assert gpu.max_relative_difference(got.losses, ref.losses) <= 1e-6
    assert gpu.weight_mismatches(ref.state, got.state, rtol=1e-4, atol=1e-5, outlier_fraction=0,
                                 outlier_bound=0) == []
    assert got.info["homes"]["host"] > 1 and got.info["io_per_step"]["host_to_device"] > 0


def test_a_model_that_cannot_be_built_fails_the_check(tmp_path):
    report = smoke(tmp_path, shape=gpu.ModelShape(hidden=64, layers=2, intermediate=128, heads=5, vocab=96))
    assert not report["passed"] and "model and batches built" in failed(report)
    assert "OVERALL: FAIL" in gpu_check.format_report(report)
