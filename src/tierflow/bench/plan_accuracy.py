"""`tierflow bench plan-accuracy`: the cost model's predictions against real training steps.

For each configuration (model size x budgets/placement) it predicts, with the cached
calibration (`tierflow bench calibrate`), the step time and the peak accounted bytes
of the device and host tiers, then trains the same model for a few steps and
measures them: the median step time after warm-up and `engine.budget_peaks()`.
It prints the matrix with relative errors (targets: step time within 20%, peak
memory per tier within 10%).
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass

import torch

import tierflow
from tierflow.bench.report import write_json
from tierflow.bench.train import timed_step
from tierflow.config import OffloadConfig, format_size
from tierflow.core.plan import Variant

MIB = 2**20
# name -> (hidden, layers, intermediate, heads), byte vocabulary; llama-100m is tierflow train's default.
SIZES = {"llama-20m": (512, 6, 1376, 8), "llama-50m": (768, 7, 2048, 12), "llama-100m": (768, 14, 2048, 12)}
# name -> (offload keyword arguments, placement); "nvme" is filled with the spill directory. The
# last two spend the budgets of "mixed" and "nvme" otherwise than the planner would (half the
# free device room for state; slow units spread, twice the prefetch window): do predicted and
# measured step times move together?
SETTINGS = {
    "device": (dict(), "device"),
    "host": (dict(device_memory="64MiB"), "host"),
    "mixed": (dict(device_memory="128MiB"), "auto"),
    "nvme": (dict(device_memory="64MiB", host_memory="256MiB", nvme=True), "auto"),
    "train": (dict(device_memory="256MiB", host_memory="1GiB", nvme=True), "auto"),  # tierflow train's
    "mixed/2": (dict(device_memory="128MiB"), Variant("front", 0.5, 1.0)),
    "nvme/s": (dict(device_memory="64MiB", host_memory="256MiB", nvme=True), Variant("spread", 1.0, 2.0)),
}
# The default matrix: 2 sizes x 4 settings, tierflow train's default model in memory and as it
# trains, and two other ways to spend llama-50m's budgets.
DEFAULT = [(size, setting) for size in ("llama-20m", "llama-50m") for setting in ("device", "host", "mixed", "nvme")]
DEFAULT += [("llama-100m", "device"), ("llama-100m", "train"), ("llama-50m", "mixed/2"), ("llama-50m", "nvme/s")]


@dataclass(frozen=True)
class Row:
    """Predicted and measured figures of one configuration."""

    model: str
    setting: str
    params: int
    homes: str
    predicted_step_s: float
    measured_step_s: float
    bottleneck: str
    predicted_device: int
    measured_device: int
    predicted_host: int
    measured_host: int
    others_load: float  # cores other processes used meanwhile (noise)

    @property
    def step_error(self) -> float:
        return _error(self.predicted_step_s, self.measured_step_s)

    @property
    def device_error(self) -> float:
        return _error(self.predicted_device, self.measured_device)

    @property
    def host_error(self) -> float:
        return _error(self.predicted_host, self.measured_host)


def _error(predicted: float, measured: float) -> float:
    if measured == 0:
        return 0.0 if predicted == 0 else float("inf")
    return (predicted - measured) / measured


def build(size: str, seed: int = 0):
    """A randomly initialised Llama of one of `SIZES`, byte vocabulary."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tierflow.data import BYTE_VOCAB_PADDED

    hidden, layers, inter, heads = SIZES[size]
    cfg = LlamaConfig(vocab_size=BYTE_VOCAB_PADDED, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=2048, tie_word_embeddings=False, use_cache=False)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg)


def measure(size: str, setting: str, cal, seq_len: int, steps: int, warmup: int, spill_dir: str,
            device: str = "cpu") -> Row:
    """Predict, then train `steps` steps and measure one configuration."""
    from tierflow.bench.probes import load_mark, others_load
    from tierflow.core.planner import predict

    kwargs, placement = SETTINGS[setting]
    kwargs = dict(kwargs, nvme=spill_dir) if kwargs.get("nvme") else kwargs
    model = build(size)
    params = sum(p.numel() for p in model.parameters())
    cfg = OffloadConfig.create(device=device, **kwargs)
    pred = predict(model, cfg, cal, batch_size=1, seq_len=seq_len, placement=placement)
    if placement == "auto":  # the planner's choice with `cal` (the engine's own would use the cached one)
        placement = pred.placement.variant
    engine = tierflow.offload(model, device=device, placement=placement, batch_shape=(1, seq_len), **kwargs)
    mark = load_mark()
    try:
        opt = tierflow.AdamW(engine, lr=1e-4)
        gen = torch.Generator().manual_seed(1)
        times = []
        for i in range(warmup + steps):
            ids = torch.randint(0, 256, (1, seq_len), generator=gen).to(device)
            seconds, _ = timed_step(engine, opt, {"input_ids": ids, "labels": ids}, lambda: opt.clip_grad_norm_(1.0))
            if i >= warmup:
                times.append(seconds)
        peaks = engine.budget_peaks()
        if engine.plan.homes != pred.placement.homes:
            print(f"  warning: {size} {setting}: the engine placed units otherwise than predicted")
        homes = ", ".join(f"{h} {engine.plan.homes.count(h)}" for h in ("device", "host", "nvme")
                          if h in engine.plan.homes)
    finally:
        engine.close()
    return Row(size, setting, params, homes, pred.step.step_s, statistics.median(times), pred.step.bottleneck,
               pred.peaks["device"], peaks["device"][0], pred.peaks["host"], peaks["host"][0], others_load(mark))


def _measure_quietly(size, setting, cal, seq_len, steps, warmup, spill, device, quiet_wait, max_load,
                     attempts) -> Row:
    """`measure`, again while other processes used more than `max_load` cores (the quietest kept)."""
    tries = []
    while len(tries) < attempts and (not tries or tries[-1].others_load > max_load):
        if quiet_wait:
            wait_until_quiet(quiet_wait, max_load)
        tries.append(measure(size, setting, cal, seq_len, steps, warmup, spill, device))
    return min(tries, key=lambda row: row.others_load)


def wait_until_quiet(max_seconds: float, threshold: float = 0.2, window: float = 2.0) -> float:
    """Wait (up to `max_seconds`) until other processes use less than `threshold` cores over
    `window` seconds; returns the last load seen."""
    from tierflow.bench.probes import load_mark, others_load

    deadline, load = time.perf_counter() + max_seconds, 0.0
    while True:
        mark = load_mark()
        time.sleep(window)
        load = others_load(mark)
        if load < threshold or time.perf_counter() >= deadline:
            return load


def print_matrix(rows: list[Row]) -> None:
    """One line per configuration: predicted / measured / error for step time and peaks."""
    print(f"{'model':<10} {'setting':<7} {'homes (units)':<24} {'step s pred/meas':>17} {'err':>6}  "
          f"{'device peak pred/meas':>23} {'err':>6}  {'host peak pred/meas':>23} {'err':>6}  bottleneck  others")
    for r in rows:
        print(f"{r.model:<10} {r.setting:<7} {r.homes:<24} {r.predicted_step_s:>8.3f}/{r.measured_step_s:<8.3f} "
              f"{r.step_error:>+6.0%}  {_mib(r.predicted_device):>11}/{_mib(r.measured_device):<11} "
              f"{r.device_error:>+6.1%}  {_mib(r.predicted_host):>11}/{_mib(r.measured_host):<11} "
              f"{r.host_error:>+6.1%}  {r.bottleneck:<10}  {r.others_load:.2f}")
    step_ok = sum(abs(r.step_error) <= 0.20 for r in rows)
    mem_ok = sum(abs(r.device_error) <= 0.10 and abs(r.host_error) <= 0.10 for r in rows)
    print("others: cores used by other processes during the measurement (noise)")
    print(f"within target: step time {step_ok}/{len(rows)} (20%), peak memory {mem_ok}/{len(rows)} (10%); "
          f"max |error|: step {max(abs(r.step_error) for r in rows):.0%}, device "
          f"{max(abs(r.device_error) for r in rows):.1%}, host {max(abs(r.host_error) for r in rows):.1%}")


def _mib(nbytes: int) -> str:
    return f"{nbytes / MIB:.1f}M"


def run_plan_accuracy_bench(sizes=None, settings=None, seq_len: int = 256, steps: int = 5, warmup: int = 2,
                            nvme: str | None = None, recalibrate: bool = False, json_path=None,
                            device: str = "cpu", quiet_wait: float = 120.0, calibrate_each: bool = False,
                            max_load: float = 0.1, attempts: int = 3) -> list[Row]:
    """Run the matrix (default: `DEFAULT`; else every given size x every given setting) and print it. Before calibrating and
    before each configuration it waits up to `quiet_wait` s for other processes to go idle.
    `calibrate_each`: calibrate again right before each configuration (not cached), so that
    prediction and measurement see the machine in the same state (shared machines drift). A
    configuration measured while other processes used more than `max_load` cores is measured
    again (up to `attempts` times; the quietest attempt is kept)."""
    from tierflow.bench.calibrate import calibrate, get_calibration
    from tierflow.core.figures import describe

    spill = nvme or tempfile.mkdtemp(prefix="tierflow-plan-accuracy-")
    try:
        if recalibrate and quiet_wait:
            wait_until_quiet(quiet_wait)
        cal, cached = get_calibration(device, torch.float32, spill, recalibrate)
        print(f"calibration ({'cached' if cached else 'measured now'}):")
        for line in describe(cal):
            print("  " + line)
        matrix = DEFAULT if sizes is None and settings is None else \
            [(size, setting) for size in sizes or SIZES for setting in settings or SETTINGS]
        rows = []
        for size, setting in matrix:
            if calibrate_each:
                wait_until_quiet(quiet_wait, max_load)
                cal = calibrate(device, torch.float32, spill)
            rows.append(_measure_quietly(size, setting, cal, seq_len, steps, warmup, spill, device,
                                         quiet_wait, max_load, attempts))
            r = rows[-1]
            print(f"  {size} {setting}: step {r.measured_step_s:.3f} s (predicted {r.predicted_step_s:.3f}), "
                  f"device peak {format_size(r.measured_device)}, host {format_size(r.measured_host)}, "
                  f"others {r.others_load:.2f}", flush=True)
    finally:
        if nvme is None:
            shutil.rmtree(spill, ignore_errors=True)
    print_matrix(rows)
    write_json([dict(asdict(r), step_error=r.step_error, device_error=r.device_error, host_error=r.host_error)
                for r in rows], json_path)
    return rows
