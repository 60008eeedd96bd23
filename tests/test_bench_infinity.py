"""`tierflow bench infinity` on a tiny model: same weights and batches for every contender,
tierflow's NVMe run trains exactly like torch, DeepSpeed is skipped cleanly when missing."""
from __future__ import annotations

import pytest

from tierflow.bench import gpu, infinity
from tierflow.errors import ConfigError

TINY = gpu.ModelShape(hidden=64, layers=2, intermediate=128, heads=4, vocab=96)


def test_infinity_bench_runs_contenders_side_by_side(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(infinity, "_importable", lambda module: False)  # as without DeepSpeed
    cfg = infinity.InfinityConfig(TINY, seq_len=16, steps=3, warmup=1, device_memory="256KiB",
                                  host_memory="1MiB", nvme=str(tmp_path / "runs"), disk_bytes=8 << 20)
    results = infinity.run_infinity_bench(cfg, json_path=tmp_path / "r.json", timeout=600)
    out = capsys.readouterr().out
    by_name = {r["name"]: r for r in results}
    for name in infinity.DEEPSPEED:
        assert "deepspeed is not installed" in by_name[name]["error"]
    torch_run, tf = by_name["torch"], by_name["tierflow-nvme"]
    assert torch_run["checksum"] == tf["checksum"]
    assert torch_run["losses"] == tf["losses"]  # fp32, torch's fused AdamW arithmetic: bitwise
    assert tf["homes"]["nvme"] > 0 and tf["io_per_step"]["nvme_read"] > 0
    assert "B/param" in out and "tierflow step / bound" in out and (tmp_path / "r.json").exists()


@pytest.mark.parametrize("steps,warmup", [(2, 2), (3, -1)])
def test_infinity_bench_rejects_steps_without_measurements(steps, warmup, tmp_path):
    with pytest.raises(ConfigError, match="must exceed --warmup"):
        infinity.run_infinity_bench(infinity.InfinityConfig(TINY, steps=steps, warmup=warmup, nvme=str(tmp_path)))


def test_infinity_bench_rejects_unknown_contenders(tmp_path):
    with pytest.raises(ConfigError, match="unknown contender"):
        infinity.run_infinity_bench(infinity.InfinityConfig(TINY, nvme=str(tmp_path)), contenders=("fsdp",))


def test_tuned_deepspeed_differs_only_in_its_async_io(tmp_path):
    """The tuned contender is DeepSpeed's default ZeRO-Infinity with its aio section set."""
    cfg = infinity.InfinityConfig(TINY, nvme=str(tmp_path))
    default, tuned = (infinity.deepspeed_config(cfg, tmp_path, tuned=t) for t in (False, True))
    assert "aio" not in default and tuned.pop("aio") == infinity.TUNED_AIO
    assert tuned == default


def test_rounds_compare_contenders_round_by_round(monkeypatch, tmp_path, capsys):
    """Two rounds: every contender twice, each result tagged with its round, and tierflow's
    median ratios against the others printed from the per-round pairs."""
    monkeypatch.setattr(infinity, "_importable", lambda module: False)
    monkeypatch.setattr(infinity, "disk_gbps", lambda directory, size: (1.0, 1.0, "stub"))
    cfg = infinity.InfinityConfig(TINY, seq_len=16, steps=2, warmup=1, device_memory="256KiB",
                                  host_memory="1MiB", nvme=str(tmp_path / "runs"))
    results = infinity.run_infinity_bench(cfg, contenders=("torch", "tierflow-nvme"), timeout=600, rounds=2)
    assert sorted((r["round"], r["name"]) for r in results) == [
        (1, "tierflow-nvme"), (1, "torch"), (2, "tierflow-nvme"), (2, "torch")]
    out = capsys.readouterr().out
    assert "tierflow-nvme vs torch over 2 rounds" in out and "round 2 of 2" in out
    with pytest.raises(ConfigError, match="--rounds"):
        infinity.run_infinity_bench(cfg, rounds=0)


def test_round_summary_takes_medians_of_the_pairs():
    def r(name, rnd, step, rss):
        return {"name": name, "round": rnd, "median_step_s": step, "peak_rss": rss}
    results = [r("tierflow-nvme", 1, 2.0, 2), r("deepspeed-infinity", 1, 5.0, 8),
               r("tierflow-nvme", 2, 2.0, 2), r("deepspeed-infinity", 2, 6.0, 8),
               r("tierflow-nvme", 3, 1.0, 2), {"name": "deepspeed-infinity", "round": 3, "error": "failed"}]
    (line,) = infinity.round_summary(results)
    assert "over 2 rounds: 2.75x its speed (rounds: 2.50, 3.00)" in line and "0.25x its peak RSS" in line
