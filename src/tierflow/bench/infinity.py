"""`tierflow bench infinity`: NVMe-homed training on the CPU against DeepSpeed ZeRO-Infinity.

Every contender trains the same model (built from one seed: a weight checksum is printed)
on the same batches, fp32, AdamW (lr 1e-4, weight decay 0.01), clip 1.0, each in its own
process (its own peak RSS; DeepSpeed's process group meets nobody):

* `torch`: plain PyTorch, everything in memory, `torch.optim.AdamW(fused=True)` (reference);
* `tierflow-nvme`: `tierflow.offload` with small device and host budgets and an NVMe
  directory: the state that fits neither lives in the spill file;
* `deepspeed-infinity`: DeepSpeed ZeRO-3 with parameters and optimizer state offloaded to
  NVMe (ZeRO-Infinity), its defaults otherwise, single process on the CPU
  (`DS_ACCELERATOR=cpu`, gloo); skipped with a message when deepspeed does not import;
* `deepspeed-infinity-tuned`: the same with its async I/O tuned as its docs ask per machine,
  to tierflow's own pattern: 8 MiB blocks, 4 threads, queue depth 32 (`TUNED_AIO`).

Printed per contender: s/step (median after the warm-up steps), peak RSS of its process
(VmHWM: model build included, the same for all), the losses; then tierflow's speed and peak
RSS relative to DeepSpeed's, and how close tierflow's step is to its disk bound: its NVMe
bytes per step over the disk's fio (or O_DIRECT) bandwidth, measured in the same run.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from tierflow.bench import gpu
from tierflow.bench.isolated import checksum, print_result, run_isolated

CONTENDERS = ("torch", "tierflow-nvme", "deepspeed-infinity", "deepspeed-infinity-tuned")
DEEPSPEED = ("deepspeed-infinity", "deepspeed-infinity-tuned")
# DeepSpeed's async I/O (its defaults: 1 MiB blocks, queue depth 8, one thread) set to the
# pattern tierflow's NVMe tier uses on this disk: 8 MiB requests, 4 threads.
TUNED_AIO = {"block_size": 8 << 20, "queue_depth": 32, "intra_op_parallelism": 4, "single_submit": False,
             "overlap_events": True}
SHAPE_171M = gpu.ModelShape(hidden=1024, layers=12, intermediate=2816, heads=16, vocab=8000)  # 170.6 M
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 1e-4, (0.9, 0.999), 1e-8, 0.01, 1.0


@dataclass(frozen=True)
class InfinityConfig:
    """One comparison: model, batch, steps, and tierflow's budgets (DeepSpeed has none)."""

    shape: gpu.ModelShape = SHAPE_171M
    batch: int = 1
    seq_len: int = 128
    steps: int = 8
    warmup: int = 2
    seed: int = 0
    device_memory: str = "256MiB"
    host_memory: str = "1GiB"
    nvme: str = ""      # directory for the spill files (each contender its own subdirectory)
    threads: int = 0    # torch threads per contender (0: torch's default)
    disk_bytes: int = 1 << 30  # bytes fio (or the O_DIRECT store) reads and writes for the disk bound


def peak_rss() -> int:
    """The process's peak resident set size so far (VmHWM), bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def torch_stepper(model, cfg: InfinityConfig, spill: Path):
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                            fused=True)

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        return loss
    return step, None


def tierflow_stepper(model, cfg: InfinityConfig, spill: Path):
    import tierflow

    engine = tierflow.offload(model, device="cpu", device_memory=cfg.device_memory,
                              host_memory=cfg.host_memory, nvme=spill)
    opt = tierflow.AdamW(engine, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)

    def step(ids):
        loss = engine(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.clip_grad_norm_(CLIP)
        opt.step()
        opt.zero_grad()
        return loss
    return step, engine


def deepspeed_config(cfg: InfinityConfig, spill: Path, tuned: bool = False) -> dict:
    """ZeRO-3 with parameters and optimizer on NVMe; DeepSpeed's defaults for everything else
    (`tuned`: its async I/O set to TUNED_AIO)."""
    nvme = {"device": "nvme", "nvme_path": str(spill), "pin_memory": False}
    config = {"train_micro_batch_size_per_gpu": cfg.batch, "gradient_accumulation_steps": 1,
              "gradient_clipping": CLIP, "steps_per_print": 10**9,
              "zero_optimization": {"stage": 3, "offload_param": nvme, "offload_optimizer": nvme},
              "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS,
                                                         "weight_decay": WEIGHT_DECAY}}}
    if tuned:
        config["aio"] = dict(TUNED_AIO)
    return config


def deepspeed_stepper(model, cfg: InfinityConfig, spill: Path, tuned: bool = False):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # ImportError: the contender is reported as skipped

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(29500 + os.getpid() % 1000))):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="gloo")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(cfg, spill, tuned))

    def step(ids):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        return loss
    return step, None


STEPPERS = {"torch": torch_stepper, "tierflow-nvme": tierflow_stepper, "deepspeed-infinity": deepspeed_stepper,
            "deepspeed-infinity-tuned": lambda model, cfg, spill: deepspeed_stepper(model, cfg, spill, tuned=True)}


def run_contender(name: str, cfg: InfinityConfig) -> dict:
    """Build the seeded model and train `cfg.steps` steps with contender `name` (this process)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = gpu.build_initial_model(cfg.shape, cfg.seed, "cpu", max_positions=max(cfg.seq_len, 128))
    result = {"name": name, "params": sum(p.numel() for p in model.parameters()), "checksum": checksum(model)}
    batches = gpu.make_batches(cfg.steps, cfg.batch, cfg.seq_len, cfg.shape.vocab, "cpu", seed=cfg.seed + 1)
    spill = Path(cfg.nvme) / name
    spill.mkdir(parents=True, exist_ok=True)
    step, engine = STEPPERS[name](model, cfg, spill)
    del model  # the engines hold what they need
    seconds, losses, io_before = [], [], None
    try:
        for i, ids in enumerate(batches):
            if i == cfg.warmup and engine is not None:
                io_before = engine.io_stats()
            start = time.perf_counter()
            losses.append(float(step(ids)))
            seconds.append(time.perf_counter() - start)
        if engine is not None:
            measured = max(1, cfg.steps - cfg.warmup)
            after = engine.io_stats()
            result["io_per_step"] = {k: (after[k] - (io_before or {}).get(k, 0)) / measured for k in after}
            result["homes"] = {h: engine.plan.homes.count(h) for h in ("device", "host", "nvme")}
            result["nvme_params"] = sum(u.numel for u, h in zip(engine.units, engine.plan.homes) if h == "nvme")
    finally:
        if engine is not None:
            engine.close()
    result.update(step_s=seconds, median_step_s=statistics.median(seconds[cfg.warmup:] or seconds),
                  losses=losses, peak_rss=peak_rss())
    return result


def run_in_subprocess(name: str, cfg: InfinityConfig, timeout: float | None) -> dict:
    """`run_contender` in a fresh Python process; a failure or a missing DeepSpeed is recorded."""
    if name in DEEPSPEED and not _importable("deepspeed"):
        return {"name": name, "error": "deepspeed is not installed (DS_BUILD_OPS=0 pip install "
                "--no-build-isolation deepspeed; its async I/O op needs libaio-dev): skipped"}
    return run_isolated("tierflow.bench.infinity", name, asdict(cfg), timeout)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def disk_gbps(directory: Path, size: int = 1 << 30) -> tuple[float | None, float | None, str]:
    """(read, write) GB/s of the disk under `directory`: fio's best of tierflow's own pattern (4
    threads of 8 MiB requests into huge-page buffers, as its staging buffers are), the same into
    4 KiB pages, and libaio QD32 1 MiB, O_DIRECT, `size` bytes; without fio, tierflow's own
    O_DIRECT store. (Into 4 KiB pages this virtual disk reads at about 40 % of its speed into
    huge pages: measured 1.2 vs 3.1 GB/s, so a bound without huge pages is too lenient.)"""
    from tierflow.bench.io import FIO_FILE, find_fio, fio_gbps, fio_jobs, huge_pages_for_fio

    fio = find_fio(install=False)
    if fio is not None:
        try:
            with huge_pages_for_fio(4 * 24 << 20) as huge:
                jobs = fio_jobs(8 << 20, 4, huge)
                rw = [max(fio_gbps(fio, job, directory, size, write=w, direct=True) for job in jobs)
                      for w in (False, True)]
            return rw[0], rw[1], "fio" + (", huge pages" if huge else "")
        except (subprocess.CalledProcessError, ValueError, KeyError) as exc:
            print(f"fio failed ({exc}): measuring with tierflow's O_DIRECT store", flush=True)
        finally:
            (directory / FIO_FILE).unlink(missing_ok=True)  # fio's 1 GiB file, in the user's --nvme
    from tierflow.bench.probes import nvme_bps

    read, write = nvme_bps(directory, total=max(size, 32 << 20))
    return read / 1e9, write / 1e9, "tierflow O_DIRECT store"


def report(results: list[dict], cfg: InfinityConfig, disk: tuple) -> list[str]:
    """The comparison: per contender, then tierflow against DeepSpeed and its disk bound."""
    ok = {r["name"]: r for r in results if "error" not in r}
    gib = lambda n: f"{n / 2**30:.2f} GiB"
    sums = sorted({round(r["checksum"], 2) for r in ok.values()})
    lines = [f"model: {cfg.shape} ({next(iter(ok.values()))['params'] / 1e6 if ok else 0:.1f} M params), "
             f"batch {cfg.batch}x{cfg.seq_len}, fp32, AdamW, clip {CLIP}; tierflow budgets: device "
             f"{cfg.device_memory}, host {cfg.host_memory}, NVMe {cfg.nvme}; initial weight checksum(s): {sums}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['name']:<20} not run: {r['error']}")
            continue
        lines.append(f"{r['name']:<20} {r['median_step_s']:7.3f} s/step  peak RSS {gib(r['peak_rss']):>10}  "
                     f"losses {[round(x, 4) for x in r['losses']]}")
    tf = ok.get("tierflow-nvme")
    for ds in (ok[name] for name in DEEPSPEED if name in ok and tf):
        lines.append(f"tierflow-nvme vs {ds['name']}: {ds['median_step_s'] / tf['median_step_s']:.2f}x "
                     f"faster, at {tf['peak_rss'] / ds['peak_rss']:.2f}x its peak RSS")
    if tf and "io_per_step" in tf:
        lines += disk_bound_lines(tf, disk)
    return lines


def disk_bound_lines(tf: dict, disk: tuple) -> list[str]:
    """tierflow's NVMe bytes per step, per NVMe-homed parameter, and its step against the bound."""
    io, n = tf["io_per_step"], max(1, tf["nvme_params"])
    read, written = io["nvme_read"], io["nvme_written"]
    lines = [f"tierflow homes {tf['homes']}, {tf['nvme_params'] / 1e6:.1f} M NVMe-homed params; per step: NVMe "
             f"read {read / 2**20:.0f} MiB ({read / n:.1f} B/param), written {written / 2**20:.0f} MiB "
             f"({written / n:.1f} B/param)"]
    read_gbps, write_gbps, how = disk
    if read_gbps and write_gbps:
        bound = read / (read_gbps * 1e9) + written / (write_gbps * 1e9)
        lines.append(f"disk ({how}): read {read_gbps:.2f} GB/s, write {write_gbps:.2f} GB/s; disk bound "
                     f"{bound:.3f} s/step; tierflow step / bound = {tf['median_step_s'] / bound:.2f}")
    return lines


def run_infinity_bench(cfg: InfinityConfig, contenders=CONTENDERS, json_path=None,
                       timeout: float | None = 1800, rounds: int = 1) -> list[dict]:
    """Measure the disk, run each contender in its own process, `rounds` times over (round after
    round, so that every round compares contenders measured minutes apart: this machine drifts
    by more than the differences measured), print and return the results (each with its round)."""
    from tierflow.errors import ConfigError

    unknown = [c for c in contenders if c not in STEPPERS]
    if unknown:
        raise ConfigError(f"unknown contender(s) {unknown}: choose from {', '.join(CONTENDERS)}")
    if cfg.warmup < 0 or cfg.steps <= cfg.warmup:
        raise ConfigError(f"--steps ({cfg.steps}) must exceed --warmup ({cfg.warmup}), which must be >= 0: "
                          "the median is taken over the steps after the warm-up")
    if rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, got {rounds}")
    made = not cfg.nvme
    cfg = replace(cfg, nvme=cfg.nvme or tempfile.mkdtemp(prefix="tierflow-infinity-"))
    directory = Path(cfg.nvme)
    directory.mkdir(parents=True, exist_ok=True)
    results, disks = [], []
    try:
        for round_ in range(1, rounds + 1):
            disk = disk_gbps(directory, cfg.disk_bytes) if "tierflow-nvme" in contenders else (None, None, "")
            this_round = []
            for name in contenders:
                print(f"[{time.strftime('%H:%M:%S')}] {name} (round {round_} of {rounds}) ...", flush=True)
                this_round.append(dict(run_in_subprocess(name, cfg, timeout), round=round_))
                shutil.rmtree(directory / name, ignore_errors=True)
            print("\n".join(report(this_round, cfg, disk)), flush=True)
            results += this_round
            disks.append(disk)
    finally:
        if made:
            shutil.rmtree(directory, ignore_errors=True)
    if rounds > 1:
        print("\n".join(round_summary(results)), flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps({"config": asdict(cfg), "disk": disks, "results": results}, indent=1))
    return results


def round_summary(results: list[dict]) -> list[str]:
    """tierflow's speed and peak RSS relative to each other contender, round by round, and the medians."""
    by_round: dict[int, dict] = {}
    for r in results:
        if "error" not in r:
            by_round.setdefault(r["round"], {})[r["name"]] = r
    lines = []
    for other in [name for name in CONTENDERS if name != "tierflow-nvme"]:
        pairs = [(rs[other], rs["tierflow-nvme"]) for rs in by_round.values() if other in rs and "tierflow-nvme" in rs]
        if not pairs:
            continue
        speed = [o["median_step_s"] / t["median_step_s"] for o, t in pairs]
        rss = [t["peak_rss"] / o["peak_rss"] for o, t in pairs]
        lines.append(f"tierflow-nvme vs {other} over {len(pairs)} rounds: {statistics.median(speed):.2f}x its speed "
                     f"(rounds: {', '.join(f'{x:.2f}' for x in speed)}), {statistics.median(rss):.2f}x its peak RSS "
                     f"(rounds: {', '.join(f'{x:.2f}' for x in rss)})")
    return lines


if __name__ == "__main__":  # one contender, in its own process (run_in_subprocess)
    request = json.loads(sys.argv[1])
    config = request["config"]
    out = run_contender(request["name"], InfinityConfig(**{**config, "shape": gpu.ModelShape(**config["shape"])}))
    print_result(out)
