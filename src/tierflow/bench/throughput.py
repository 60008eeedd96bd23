"""`tierflow bench train --device cuda`: training throughput against the offloading baselines.

Every contender trains the same model (built from one seed: a weight checksum is printed) on
the same batches, bf16 compute with fp32 master weights, AdamW, clip 1.0, each in its own
process (so each has its own peak host RSS, and DeepSpeed's and FSDP's process groups do not
meet):

* `torch`: everything on the GPU, autocast bf16, fused AdamW (the speed of light);
* `tierflow-host`: state homed in host memory within `--device-memory` (tierflow's default);
* `tierflow-nvme`: the same with `--host-memory` small enough that state spills to NVMe;
* `deepspeed-offload`: DeepSpeed ZeRO-3, parameters and optimizer offloaded to the CPU
  (DeepSpeedCPUAdam), bf16; skipped with a message if deepspeed does not import;
* `fsdp2-offload`: FSDP2 `fully_shard` per decoder block + `CPUOffloadPolicy`, bf16 mixed
  precision, torch's fused AdamW on the CPU.

Printed per contender: s/step (median after the warm-up steps, wall clock between step ends,
one device sync per step), tokens/s, model TFLOP/s (6 x parameters x tokens, attention not
counted), peak GPU memory (max_memory_allocated), peak host RSS while training, the first
losses; then each one's step time relative to torch and to DeepSpeed.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from tierflow.bench import gpu
from tierflow.bench.isolated import checksum, print_result, run_isolated
from tierflow.bench.limits import HOST_BYTES_PER_PARAM, describe_limits, host_memory_bound, limits

CONTENDERS = ("torch", "tierflow-host", "tierflow-nvme", "deepspeed-offload", "fsdp2-offload")
EXTRA_CONTENDERS = ("tierflow-host-cpu-update",)  # tierflow-host with update_on="cpu"


@dataclass(frozen=True)
class ThroughputConfig:
    """One comparison: model, batch, steps and tierflow's budgets (the baselines have none)."""

    shape: gpu.ModelShape = gpu.ONE_B
    batch: int = 4
    seq_len: int = 1024
    steps: int = 8
    warmup: int = 3
    lr: float = 1e-4
    seed: int = 0
    device: str = "cuda"
    device_memory: str = "4GiB"
    host_memory: str = "64GiB"
    nvme_host_memory: str = "8GiB"
    nvme: str | None = None
    offload_options: dict = field(default_factory=dict)   # extra tierflow.offload keywords
    profile_dir: str | None = None                         # tierflow: event timeline + lane totals


class PeakRss:
    """The process's peak resident set size while running (sampled every 10 ms)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(0.01)

    def __enter__(self):
        self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_loop(step, batches, device: str, profile_step: int | None = None,
               profile_out: Path | None = None) -> tuple[list[float], list[float]]:
    """Run `step(ids) -> loss tensor` per batch; (seconds per step, losses). One device sync
    per step ends its timing (the offloading systems finish their step on the host anyway).
    Step number `profile_step` runs under torch.profiler (its table goes to `profile_out`)."""
    seconds, losses = [], []
    for i, ids in enumerate(batches):
        profiler = torch_profiler(device) if i == profile_step else None
        start = time.perf_counter()
        if profiler is not None:
            profiler.__enter__()
        loss = step(ids)
        _sync(device)
        seconds.append(time.perf_counter() - start)
        if profiler is not None:
            profiler.__exit__(None, None, None)
            sort = "self_cuda_time_total" if torch.device(device).type == "cuda" else "self_cpu_time_total"
            profile_out.write_text(profiler.key_averages().table(sort_by=sort, row_limit=40))
        losses.append(loss.detach().float())
    return seconds, [float(x) for x in torch.stack(losses).cpu()]


def torch_profiler(device: str):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def torch_stepper(model, device: str, lr: float):
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(ids):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        return loss
    return step, None, {}


def predicted_step_s(model, cfg: ThroughputConfig, kwargs: dict) -> float | None:
    """The planner's step time for this run (what `tierflow plan` prints), from this machine's
    cached calibration or the nominal figures; None if it cannot say."""
    from tierflow.config import OffloadConfig
    from tierflow.core import figures
    from tierflow.core.planner import predict

    try:
        offload_cfg = OffloadConfig.create(**kwargs)
        cal = figures.for_planning(cfg.device, torch.bfloat16)
        return predict(model, offload_cfg, cal, cfg.batch, cfg.seq_len).step.step_s
    except Exception as exc:  # noqa: BLE001 -- a missing prediction is reported, not fatal
        print(f"no prediction: {type(exc).__name__}: {exc}")
        return None


def tierflow_stepper(model, cfg: ThroughputConfig, host_memory: str, **options):
    import tierflow

    kwargs = dict(device=cfg.device, dtype=torch.bfloat16, device_memory=cfg.device_memory, host_memory=host_memory,
                  nvme=cfg.nvme or tempfile.mkdtemp(prefix="tierflow-tp-"), **{**cfg.offload_options, **options})
    predicted = predicted_step_s(model, cfg, kwargs)
    engine = tierflow.offload(model, **kwargs)
    opt = tierflow.AdamW(engine, lr=cfg.lr)

    def step(ids):
        loss = engine(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        return loss
    return step, engine, {"predicted_step_s": predicted,
                          "budgets": {"device": cfg.device_memory, "host": host_memory}}


def deepspeed_stepper(model, cfg: ThroughputConfig):
    import deepspeed  # noqa: F401 -- ImportError: the contender is skipped

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(29500 + os.getpid() % 1000))):
        os.environ.setdefault(key, value)
    cuda = torch.device(cfg.device).type == "cuda"
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    offload = {"device": "cpu", "pin_memory": cuda}
    config = {"train_micro_batch_size_per_gpu": cfg.batch, "gradient_accumulation_steps": 1,
              "gradient_clipping": 1.0, "bf16": {"enabled": True}, "steps_per_print": 10**9,
              "zero_optimization": {"stage": 3, "offload_param": offload, "offload_optimizer": offload},
              "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                         "weight_decay": 0.01}}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)

    def step(ids):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        return loss
    return step, None, {}


def fsdp2_stepper(model, cfg: ThroughputConfig):
    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    cuda = torch.device(cfg.device).type == "cuda"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29600 + os.getpid() % 1000))
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    if cuda:
        torch.cuda.set_device(0)
    policy = dict(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
                  offload_policy=CPUOffloadPolicy())
    for block in gpu.decoder_blocks(model):
        fully_shard(block, **policy)
    fully_shard(model, **policy)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=True)

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return loss
    return step, None, {}


def split_options(name: str) -> tuple[str, dict]:
    """'tierflow-host[activations=auto,device_memory=10GiB]' -> ('tierflow-host', {...}): a
    tierflow contender with `tierflow.offload` keywords changed (device_memory and host_memory
    replace the run's budgets)."""
    if not name.endswith("]") or "[" not in name:
        return name, {}
    base, _, inner = name[:-1].partition("[")
    options = {}
    for item in filter(None, inner.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"contender {name!r}: options are key=value, got {item!r}")
        options[key.strip()] = value.strip()
    return base, options


def check_contender(name: str) -> None:
    """Raise ValueError for a name `make_stepper` would not know."""
    base, options = split_options(name)
    if base not in CONTENDERS + EXTRA_CONTENDERS or (options and not base.startswith("tierflow")):
        raise ValueError(f"unknown contender {name!r}: choose from {', '.join(CONTENDERS + EXTRA_CONTENDERS)}; "
                         f"tierflow ones may take [key=value,...] offload options")


def make_stepper(name: str, model, cfg: ThroughputConfig):
    check_contender(name)
    name, options = split_options(name)
    if options:
        budgets = {k: options.pop(k) for k in ("device_memory", "host_memory") if k in options}
        if name == "tierflow-nvme" and "host_memory" in budgets:  # (its budget field is nvme_host_memory)
            budgets["nvme_host_memory"] = budgets.pop("host_memory")
        cfg = replace(cfg, offload_options={**cfg.offload_options, **options}, **budgets)
    if name == "torch":
        return torch_stepper(model, cfg.device, cfg.lr)
    if name == "tierflow-host":
        return tierflow_stepper(model, cfg, cfg.host_memory)
    if name == "tierflow-host-cpu-update":
        return tierflow_stepper(model, cfg, cfg.host_memory, update_on="cpu")
    if name == "tierflow-nvme":
        return tierflow_stepper(model, cfg, cfg.nvme_host_memory)
    if name == "deepspeed-offload":
        return deepspeed_stepper(model, cfg)
    if name == "fsdp2-offload":
        return fsdp2_stepper(model, cfg)
    raise ValueError(f"unknown contender {name!r}: choose from {', '.join(CONTENDERS + EXTRA_CONTENDERS)}")


def run_contender(name: str, cfg: ThroughputConfig) -> dict:
    """Build the seeded model, train `cfg.steps` steps with contender `name`; its figures."""
    model = gpu.build_initial_model(cfg.shape, cfg.seed, cfg.device, max_positions=max(cfg.seq_len, 128))
    params = sum(p.numel() for p in model.parameters())
    result = {"name": name, "params": params, "checksum": checksum(model)}
    batches = gpu.make_batches(cfg.steps, cfg.batch, cfg.seq_len, cfg.shape.vocab, cfg.device, seed=cfg.seed + 1)
    gpu.reset_peak(cfg.device)
    if cfg.profile_dir:
        Path(cfg.profile_dir).mkdir(parents=True, exist_ok=True)
    step, engine, extra = make_stepper(name, model, cfg)
    result.update(extra)
    if engine is not None and cfg.profile_dir:
        from tierflow.bench.timeline import record_phases
        engine.events.enable()
        record_phases(engine)
    try:
        profile_out = Path(cfg.profile_dir) / f"{name}-profile.txt" if cfg.profile_dir else None
        with PeakRss() as rss:
            seconds, losses = timed_loop(step, batches, cfg.device, cfg.steps - 1 if profile_out else None,
                                         profile_out)
        if engine is not None:
            result["homes"] = {t: engine.plan.homes.count(t) for t in ("device", "host", "nvme")}
            result["gpu_updates"] = sum(engine.plan.device_updates)
            result["device_budget"] = engine.budgets["device"].capacity
            result["offdevice_trainable"] = sum(u.trainable_numel for u, h in zip(engine.units, engine.plan.homes)
                                                if h != "device")
            result["io_per_step"] = {k: v / len(batches) for k, v in engine.io_stats().items()}
            result["nvme_trainable"] = sum(u.trainable_numel for u, h in zip(engine.units, engine.plan.homes)
                                           if h == "nvme")
            if cfg.profile_dir:
                result["lanes"] = lane_totals(engine, Path(cfg.profile_dir) / f"{name}-timeline.png")
    finally:
        if engine is not None:
            engine.close()
    tokens = cfg.batch * cfg.seq_len
    measured = seconds[cfg.warmup:len(seconds) - bool(profile_out)]  # not the profiled step (check_steps)
    median = sorted(measured)[len(measured) // 2]
    result.update(step_s=seconds, median_step_s=median, tokens_per_s=tokens / median,
                  tflops=6 * params * tokens / median / 1e12, losses=losses, host_peak_rss=rss.peak,
                  gpu_peak=torch.cuda.max_memory_allocated() if torch.device(cfg.device).type == "cuda" else None)
    return result


def lane_totals(engine, png: Path) -> dict:
    """Seconds each lane of the engine was busy (all steps), and the timeline picture."""
    from tierflow.bench.timeline import lanes, save_timeline

    busy = {lane: round(sum(d for _, d in spans), 3) for lane, spans in lanes(engine.events.spans).items()}
    try:
        save_timeline(engine, png)
    except Exception as exc:  # noqa: BLE001 -- a picture is a bonus; the figures are printed anyway
        print(f"timeline picture not drawn: {exc}")
    return busy


def run_in_subprocess(name: str, cfg: ThroughputConfig, timeout: float | None = None) -> dict:
    """`run_contender` (or `limits`) in a fresh Python process; a failure is recorded, not raised."""
    return run_isolated("tierflow.bench.throughput", name, asdict(cfg), timeout)


def config_from_dict(d: dict) -> ThroughputConfig:
    return ThroughputConfig(**{**d, "shape": gpu.ModelShape(**d["shape"])})


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.1f} GiB"


def report(results: list[dict], cfg: ThroughputConfig) -> str:
    """The comparison table with ratios to torch and to DeepSpeed."""
    lim = next((r for r in results if r["name"] == "limits" and "error" not in r), None)
    results = [r for r in results if r["name"] != "limits"]
    ok = {r["name"]: r for r in results if "error" not in r}
    ref, ds = ok.get("torch"), ok.get("deepspeed-offload")
    sums = {round(r["checksum"], 3) for r in ok.values()}
    lines = [f"model: {cfg.shape}, batch {cfg.batch}x{cfg.seq_len}, bf16 compute, fp32 master, AdamW, clip 1.0; "
             f"tierflow budgets: device {cfg.device_memory}, host {cfg.host_memory} (nvme run: host "
             f"{cfg.nvme_host_memory}); initial weight checksum(s): {sorted(sums)}",
             f"{'contender':<18} {'s/step':>7} {'tokens/s':>9} {'TFLOP/s':>8} {'vs torch':>8} {'vs DS':>7} "
             f"{'GPU peak':>9} {'host RSS':>9}  first losses"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['name']:<18} not run: {r['error']}")
            continue
        t = r["median_step_s"]
        vs_torch = f"{ref['median_step_s'] / t:.2f}x" if ref else "-"
        vs_ds = f"{ds['median_step_s'] / t:.2f}x" if ds else "-"
        lines.append(f"{r['name']:<18} {t:7.3f} {r['tokens_per_s']:9.0f} {r['tflops']:8.1f} {vs_torch:>8} {vs_ds:>7} "
                     f"{_gib(r['gpu_peak']):>9} {_gib(r['host_peak_rss']):>9}  "
                     f"{[round(x, 4) for x in r['losses'][:4]]}")
        if r.get("device_budget") and r.get("gpu_peak"):
            lines.append(f"{'':<18} GPU peak / device_memory budget: {_gib(r['gpu_peak'])} / "
                         f"{_gib(r['device_budget'])} = {r['gpu_peak'] / r['device_budget']:.2f}")
        if lim and r.get("offdevice_trainable"):
            bound = host_memory_bound(r, lim)
            lines.append(f"{'':<18} host-memory bound {bound:.3f} s/step ({r['offdevice_trainable'] / 1e6:.0f} M "
                         f"parameters x {HOST_BYTES_PER_PARAM} B at {lim['host_copy_bps'] / 1e9:.0f} GB/s): "
                         f"measured / bound {t / bound:.2f}")
        if r.get("nvme_trainable"):  # the baseline: 16 B read, 17 B written (fp32 gradients)
            io, n = r["io_per_step"], r["nvme_trainable"]
            lines.append(f"{'':<18} NVMe per step and NVMe-homed parameter: {io['nvme_read'] / n:.1f} B read, "
                         f"{io['nvme_written'] / n:.1f} B written ({n / 1e6:.0f} M parameters)")
        if r.get("predicted_step_s"):
            lines.append(f"{'':<18} plan predicted {r['predicted_step_s']:.3f} s/step: measured / predicted "
                         f"{t / r['predicted_step_s']:.2f}")
        for key in ("budgets", "homes", "gpu_updates", "io_per_step", "lanes"):
            if key in r:
                lines.append(f"{'':<18} {key}: {r[key]}")
    if lim:
        lines.append(describe_limits(lim))
    lines.append("(vs torch / vs DS: that contender's speed relative to torch's / DeepSpeed's; "
                 "higher is faster)")
    if len(sums) > 1:
        lines.append("WARNING: the contenders did not start from the same weights (checksums above): "
                     "the ratios compare different runs")
    return "\n".join(lines)


def same_start(results: list[dict]) -> bool:
    """Whether every contender that ran started from the same initial weights."""
    return len({round(r["checksum"], 3) for r in results if "checksum" in r and "error" not in r}) <= 1


def check_steps(cfg: ThroughputConfig) -> None:
    """At least one timed step after the warm-up (and after the profiled last step), before any work."""
    from tierflow.errors import ConfigError

    needed = cfg.warmup + 1 + bool(cfg.profile_dir)
    if cfg.steps < needed:
        raise ConfigError(f"--steps {cfg.steps} leaves no timed step after {cfg.warmup} warm-up step(s)"
                          + (" and the profiled last step" if cfg.profile_dir else "") + f": give at least {needed}")


def run_throughput_bench(cfg: ThroughputConfig, contenders=CONTENDERS, json_path=None,
                         timeout: float | None = None) -> list[dict]:
    check_steps(cfg)
    for name in contenders:  # a typo fails before any model is built
        check_contender(name)
    print(f"[{time.strftime('%H:%M:%S')}] measuring the machine's limits ...", flush=True)
    results = [run_in_subprocess("limits", cfg, timeout)]
    for name in contenders:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        results.append(run_in_subprocess(name, cfg, timeout))
        if json_path:
            Path(json_path).write_text(json.dumps({"config": asdict(cfg), "results": results}, indent=1))
    print(report(results, cfg), flush=True)
    return results


if __name__ == "__main__":  # one contender (or the limits), in its own process (run_in_subprocess)
    request = json.loads(sys.argv[1])
    if request["name"] == "limits":
        out = {"name": "limits", **limits(request["config"]["device"])}
    else:
        out = run_contender(request["name"], config_from_dict(request["config"]))
    print_result(out)
