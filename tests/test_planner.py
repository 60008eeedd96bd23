"""The planner (planner.py): the placement with the least predicted step time within the
budgets, the engine planning with the cached calibration, and the per-unit choice of where
AdamW runs on a GPU (arithmetic only: no GPU needed)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import tierflow
from tierflow.core import figures
from tierflow.config import OffloadConfig
from tierflow.core.cost import update_job, workload
from tierflow.core.planner import predict
from tierflow.core.plan import GREEDY, Variant, plan_placement
from tierflow.core.planner import MIN_GAIN, VARIANTS, choose_placement, update_sites

from test_plan import G, fake_calibration, meta_mlp

# NVMe 5x slower than memory, fast AdamW: the units left to NVMe decide the step time.
SLOW_DISK = dict(nvme_read_bps=0.2 * G, nvme_write_bps=0.2 * G, adamw_params_per_s=1 * G)
WIDTH = 256


def mlp_config(tmp_path, device_memory="4MiB", host_memory="8MiB", **extra):
    # host_in_place=False: host-homed units stream as on a GPU, where placement matters most
    return OffloadConfig.create(device_memory=device_memory, host_memory=host_memory, nvme=tmp_path,
                                unit_bytes=WIDTH * WIDTH * 4, chunk_bytes="64KiB", staging_buffers=5,
                                **dict(dict(host_in_place=False), **extra))


@pytest.mark.parametrize("device_memory,host_memory", [("2MiB", "4MiB"), ("2MiB", "8MiB"), ("4MiB", "8MiB"),
                                                       ("8MiB", "4MiB"), ("16MiB", "16MiB")])
@pytest.mark.parametrize("tokens", [64, 1024])
def test_chosen_plan_fits_and_is_never_predicted_slower(tmp_path, device_memory, host_memory, tokens):
    model, units = meta_mlp(12, WIDTH)
    cfg = mlp_config(tmp_path, device_memory, host_memory)
    work = workload(model, units, 1, tokens, torch.float32)
    cal = fake_calibration(**SLOW_DISK)
    plan, step = choose_placement(units, cfg, torch.float32, 0, work, cal)
    greedy, greedy_step = choose_placement(units, cfg, torch.float32, 0, work, cal, "greedy")
    assert greedy.variant == GREEDY
    assert step.step_s <= greedy_step.step_s
    if plan.variant != GREEDY:
        assert step.step_s <= (1 - MIN_GAIN) * greedy_step.step_s
    assert plan.device_working + plan.tier_bytes["device"] <= cfg.device_memory
    assert plan.staging_bytes + plan.tier_bytes["host"] <= cfg.host_memory
    for variant in VARIANTS:  # the best of every variant that fits
        try:
            other = choose_placement(units, cfg, torch.float32, 0, work, cal, variant)[1]
        except tierflow.BudgetError:
            continue
        if plan.variant == GREEDY:  # kept because no variant beats it by the required margin
            assert other.step_s > (1 - MIN_GAIN) * greedy_step.step_s, variant
        else:
            assert step.step_s <= other.step_s, variant


def test_planner_spreads_disk_units_when_that_hides_their_transfers(tmp_path):
    """Greedy puts the last units on NVMe, one after another, and the compute waits for each;
    spread between host units, with a wider window, their reads overlap more compute."""
    model, units = meta_mlp(12, WIDTH)
    cfg = mlp_config(tmp_path)
    work = workload(model, units, 1, 256, torch.float32)
    plan, step = choose_placement(units, cfg, torch.float32, 0, work, fake_calibration(**SLOW_DISK))
    greedy = plan_placement(units, cfg, torch.float32, 0)
    assert greedy.homes[-3:] == ("nvme",) * 3
    assert plan.variant.order == "spread" and plan.variant.prefetch_scale > 1, plan.variant
    assert plan.homes[-3:] != ("nvme",) * 3 and plan.homes.count("nvme") >= greedy.homes.count("nvme")
    assert plan.prefetch_bytes > greedy.prefetch_bytes


def test_engine_plans_with_the_cached_calibration(tmp_path, monkeypatch, engines):
    """The engine and `tierflow plan` (cost.predict) choose the same placement from the same
    calibration and batch shape; the model then trains on it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    figures.save(fake_calibration(**SLOW_DISK), torch.float32)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(12)])
    options = dict(device_memory="4MiB", host_memory="8MiB", nvme=tmp_path / "spill", host_in_place=False,
                   unit_bytes=WIDTH * WIDTH * 4, chunk_bytes="64KiB", staging_buffers=5, batch_shape=(1, 256))
    pred = predict(model, OffloadConfig.create(**options), fake_calibration(**SLOW_DISK), 1, 256)
    assert pred.placement.variant != GREEDY
    engine = tierflow.offload(model, **options)
    engines.append(engine)
    assert engine.plan.homes == pred.placement.homes and engine.plan.variant == pred.placement.variant
    assert engine.plan.prefetch_bytes == pred.placement.prefetch_bytes
    opt = tierflow.AdamW(engine, lr=1e-3)
    x = torch.randn(4, WIDTH)
    first = None
    for _ in range(3):
        loss = engine(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else loss.item()
    assert engine(x).square().mean().item() < first


def test_without_a_calibration_the_engine_plans_with_nominal_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert figures.for_planning("cpu", torch.float32) == figures.nominal("cpu", torch.float32)
    assert figures.nominal("cuda", torch.bfloat16).device == "cuda"


def gpu_config(tmp_path, update_on="auto"):
    """A configuration as on a GPU (only arithmetic reads it: no device is touched)."""
    return dataclasses.replace(mlp_config(tmp_path, update_on=update_on), device=torch.device("cuda", 0))


def test_update_sites_share_host_units_between_cpu_and_gpu(tmp_path):
    """With update_on="auto" the CPU and the GPU update host-homed units at the same time, so
    the units are shared out until both sides' predicted totals are level."""
    model, units = meta_mlp(12, WIDTH)
    plan = plan_placement(units, mlp_config(tmp_path), torch.float32, 0)
    host = [uid for uid, h in enumerate(plan.homes) if h == "host" and units[uid].trainable_numel]
    assert len(host) >= 6
    fast_link = fake_calibration(device="cuda", h2d_bps=50 * G, d2h_bps=50 * G, device_adamw_params_per_s=100 * G,
                                 adamw_params_per_s=2 * G)
    slow_link = fake_calibration(device="cuda", h2d_bps=0.01 * G, d2h_bps=0.01 * G, adamw_params_per_s=2 * G)
    sites = update_sites(units, plan, gpu_config(tmp_path), fast_link, torch.float32)
    on_gpu = [uid for uid in host if sites[uid]]
    assert 0 < len(on_gpu) < len(host) and not any(s for s, h in zip(sites, plan.homes) if h == "device")
    seconds = {side: sum(update_job(units[uid], "host", fast_link, torch.float32, on_device=side == "gpu").seconds()
                         for uid in host if sites[uid] == (side == "gpu")) for side in ("gpu", "cpu")}
    largest = max(update_job(units[uid], "host", fast_link, torch.float32).seconds() for uid in host)
    assert abs(seconds["gpu"] - seconds["cpu"]) <= largest  # level within one unit's update
    # A link so slow that a GPU-side update costs 4x the CPU's: the GPU takes one unit at most.
    assert sum(update_sites(units, plan, gpu_config(tmp_path), slow_link, torch.float32)) <= 1
    every = update_sites(units, plan, gpu_config(tmp_path, "device"), slow_link, torch.float32)
    assert every == tuple(h != "device" and units[uid].trainable_numel > 0 for uid, h in enumerate(plan.homes))
    assert update_sites(units, plan, gpu_config(tmp_path, "cpu"), fast_link, torch.float32) == ()
    assert update_sites(units, plan, mlp_config(tmp_path), fast_link, torch.float32) == ()  # CPU device
    work = workload(model, units, 1, 256, torch.float32)
    on_gpu = choose_placement(units, gpu_config(tmp_path), torch.float32, 0, work, fast_link, GREEDY)
    on_cpu = choose_placement(units, gpu_config(tmp_path, "cpu"), torch.float32, 0, work, fast_link, GREEDY)
    assert on_gpu[0].device_updates == sites and on_gpu[1].optimizer_s < on_cpu[1].optimizer_s


@pytest.mark.parametrize("shape", [(0, 16), (2,), "big", (1, -4)])
def test_bad_batch_shape_is_refused(shape):
    with pytest.raises(tierflow.ConfigError, match="batch_shape"):
        OffloadConfig.create(batch_shape=shape)


def test_unknown_placement_names_the_choices():
    with pytest.raises(tierflow.ConfigError, match="greedy"):
        tierflow.offload(nn.Linear(4, 4), placement="fastest")
    with pytest.raises(tierflow.ConfigError, match="claim order"):
        model, units = meta_mlp(4, 16)
        plan_placement(units, OffloadConfig.create(), torch.float32, 0, variant=Variant("random"))


def test_nominal_gpu_figures_run_most_adamw_of_host_state_on_the_gpu(tmp_path):
    """Before a GPU machine is calibrated, most host-homed units update on the GPU (faster per
    unit, as measured on the H100 and H200: docs/benchmarks.md) and the CPU takes a share at
    the same time; NVMe-homed units update on the GPU too."""
    _model, units = meta_mlp(12, WIDTH)
    plan = plan_placement(units, mlp_config(tmp_path), torch.float32, 0)
    sites = update_sites(units, plan, gpu_config(tmp_path), figures.nominal("cuda", torch.float32), torch.float32)
    host = [s for s, h in zip(sites, plan.homes) if h == "host"]
    assert len(host) / 2 < sum(host) < len(host)
    assert all(s for s, h in zip(sites, plan.homes) if h == "nvme")
