"""`tierflow bench throughput` on the CPU with a tiny model: the contenders train the same
weights on the same batches, and the report carries the ratios and bounds it promises."""
from __future__ import annotations

import pytest
from dataclasses import replace

from tierflow.bench import gpu
from tierflow.bench.throughput import ThroughputConfig, check_contender, report, run_contender, split_options

TINY = ThroughputConfig(shape=gpu.TINY, batch=2, seq_len=16, steps=3, warmup=1, device="cpu",
                        device_memory="160KiB", host_memory="64MiB")


def test_tierflow_and_torch_start_from_the_same_weights_and_agree():
    # A learning rate at which 4 steps move the loss far more than bf16 rounding does, so a
    # tierflow that did not train would not agree with torch.
    config = replace(TINY, lr=3e-2, steps=4)
    ref = run_contender("torch", config)
    got = run_contender("tierflow-host[update_on=cpu]", config)
    assert got["checksum"] == ref["checksum"] and got["params"] == ref["params"]
    assert got["homes"]["host"] > 0 and got["offdevice_trainable"] > 0
    # bf16 weights against torch's fp32 weights under bf16 autocast: close, not equal
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-2)
    frozen = run_contender("torch", replace(config, lr=0.0))  # the same batches, no training
    assert frozen["losses"][1:] != pytest.approx(ref["losses"][1:], rel=1e-2), (frozen["losses"], ref["losses"])
    limits = {"name": "limits", "host_copy_bps": 1e10, "cpu_adamw_params_per_s": 1e9}
    text = report([limits, ref, got, {"name": "deepspeed-offload", "error": "not installed"}], TINY)
    assert "host-memory bound" in text and "deepspeed-offload  not run: not installed" in text
    assert "1.00x" in text  # torch against itself


def test_contender_names_and_options_are_checked_before_any_work():
    assert split_options("tierflow-host[activations=auto,device_memory=1GiB]") == (
        "tierflow-host", {"activations": "auto", "device_memory": "1GiB"})
    for bad in ("tierflow-hots", "torch[fused=1]", "tierflow-host[activations]"):
        with pytest.raises(ValueError):
            check_contender(bad)


def test_a_child_process_reports_its_result_or_its_failure():
    from tierflow.bench.isolated import launch_in_cgroup

    # print_result echoes its argument (the JSON spec, a string here) on the RESULT line
    assert launch_in_cgroup("tierflow.bench.isolated", "print_result", {"a": 1}, None, 120) == '{"a": 1}'
    failed = launch_in_cgroup("tierflow.bench.isolated", "no_such_entry", {}, None, 120)
    assert "error" in failed and "no_such_entry" in failed["error"]


def test_bench_train_on_cuda_passes_its_flags_to_throughput():
    """`tierflow bench train --device cuda` runs `bench throughput` with the flags it was given
    (none dropped), the built-in model's shape, and throughput's defaults for the rest."""
    from tierflow.cli.bench import throughput_args_of_train
    from tierflow.cli.main import build_parser
    from tierflow.errors import ConfigError

    args = build_parser().parse_args(["bench", "train", "--device", "cuda", "--model", "llama-100m", "--steps", "10",
                                      "--warmup", "3", "--seq-len", "512", "--device-memory", "256MiB",
                                      "--host-memory", "4GiB", "--nvme", "/tmp/x", "--json", "out.json"])
    tp = throughput_args_of_train(args)
    assert (tp.steps, tp.warmup, tp.seq_len, tp.device_memory, tp.host_memory, tp.nvme_host_memory, tp.nvme,
            tp.json) == (10, 3, 512, "256MiB", "4GiB", "4GiB", "/tmp/x", "out.json")
    assert (tp.hidden, tp.layers, tp.intermediate, tp.heads) == (768, 14, 2048, 12)
    defaults = throughput_args_of_train(build_parser().parse_args(["bench", "train", "--device", "cuda"]))
    assert (defaults.hidden, defaults.steps, defaults.seq_len, defaults.json) == (2048, 8, 1024, None)
    with pytest.raises(ConfigError, match="disk-gbps"):
        throughput_args_of_train(build_parser().parse_args(["bench", "train", "--device", "cuda", "--disk-gbps", "2"]))
    with pytest.raises(ConfigError, match="untied"):
        throughput_args_of_train(build_parser().parse_args(["bench", "train", "--device", "cuda", "--model", "gpt2-tiny"]))


def test_budgets_steps_and_checksums_are_checked():
    """A per-contender host budget reaches tierflow-nvme; too few steps fail before any work;
    contenders that did not start from the same weights are reported, and the CLI fails."""
    from tierflow.bench.throughput import check_steps, same_start
    from tierflow.cli.bench import ran_or_not_installed
    from tierflow.errors import ConfigError

    small = run_contender("tierflow-nvme[host_memory=1MiB,chunk_bytes=16KiB]", replace(TINY, steps=2))
    large = run_contender("tierflow-nvme[chunk_bytes=16KiB]", replace(TINY, steps=2))
    assert small["budgets"]["host"] == "1MiB" and large["budgets"]["host"] == TINY.nvme_host_memory
    assert small["homes"]["nvme"] > large["homes"]["nvme"]
    with pytest.raises(ConfigError, match="no timed step"):
        check_steps(replace(TINY, steps=2, warmup=2))
    with pytest.raises(ConfigError, match="profiled"):
        check_steps(replace(TINY, steps=3, warmup=2, profile_dir="/tmp/p"))
    a, b = {"name": "torch", "checksum": 1.0}, {"name": "tierflow-host", "checksum": 2.0}
    assert same_start([a, dict(b, checksum=1.0)]) and not same_start([a, b])
    assert "did not start from the same weights" in report([dict(a, **ROW), dict(b, **ROW)], TINY)
    assert ran_or_not_installed({"name": "deepspeed-offload", "error": "exit status 1: No module named 'deepspeed'"})
    assert not ran_or_not_installed({"name": "fsdp2-offload", "error": "exit status 1: RuntimeError: boom"})
    assert not ran_or_not_installed({"name": "tierflow-host", "error": "exit status 1: No module named 'x'"})


ROW = dict(median_step_s=1.0, tokens_per_s=1.0, tflops=1.0, gpu_peak=None, host_peak_rss=1, losses=[1.0])
