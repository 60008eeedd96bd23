"""``tierflow bench generate``: generation with a model bigger than memory, tierflow against
accelerate's disk offload, on the same model, prompts, budget and memory limit.

1. A Llama with random weights is built from a config (default ~1.46 GB in fp32, over 2.8x
   the 512 MiB host budget) and saved as safetensors shards (reused when already there).
2. fio measures the disk's sequential read bandwidth on the same file system.
3. Each contender runs in its own process inside a cgroup-v1 memory controller whose limit
   counts the page cache too, so neither can keep the model cached (root only; otherwise a
   warning is printed and the page cache is only dropped). The page cache is dropped first.
   - tierflow: `tierflow.load(trainable=False)` with device/host budgets and an NVMe spill
     directory, then `engine.generate`;
   - accelerate: `from_pretrained(device_map="auto", max_memory={"cpu": device+host budget},
     offload_folder=...)`, then `generate`;
   - in memory (no limit): the same generate with the whole model in RAM, for the compute
     time of a step.
4. Printed: tokens/s of both and the ratio, at batch 1 and at a large batch; tierflow's read
   bandwidth against fio's; each decode step against its physical bound
   max(bytes read / the disk's bandwidth, in-memory compute time of the same step). The
   disk's bandwidth of the bound is measured right before and right after tierflow's run
   (the mean of the two; fio's matched job): this machine's disk drifts by more than the
   target's margin over minutes. The run's first, best fio figure is reported beside it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tierflow.bench.io import FIO_FILE, GB, drop_caches, find_fio, fio_gbps, fio_jobs, huge_pages_for_fio
from tierflow.bench.isolated import launch_in_cgroup, print_progress
from tierflow.bench.model_dirs import parameter_bytes, saved_random_model
from tierflow.bench.report import print_row, row, write_json

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")  # cgroup v1
CGROUP_V2_ROOT = Path("/sys/fs/cgroup")
CGROUP_NAME = "tierflow-bench-generate"
MiB = 2**20


def model_config(hidden: int, layers: int, intermediate: int, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
                       max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def build_model_dir(directory: Path, config) -> int:
    """Save a randomly initialised model with `config` to `directory` (kept when it already
    holds that config); returns its parameter bytes."""
    return saved_random_model(directory, config, parameter_bytes)


# ---------------------------------------------------------------------------- cgroup

def make_cgroup(limit: int) -> Path | None:
    """A memory cgroup limited to `limit` bytes (page cache included), or None: cgroup v1
    (memory.limit_in_bytes) where mounted, else cgroup v2 (memory.max)."""
    v1 = CGROUP_ROOT.is_dir()
    # One cgroup per benchmark process: benchmarks running side by side keep their own limits.
    path = (CGROUP_ROOT if v1 else CGROUP_V2_ROOT) / f"{CGROUP_NAME}-{os.getpid()}"
    try:
        if not v1:
            (CGROUP_V2_ROOT / "cgroup.subtree_control").write_text("+memory")
        path.mkdir(exist_ok=True)
        (path / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(str(limit))
        return path
    except OSError as exc:
        print(f"WARNING: cannot use a memory cgroup at {path} ({exc}): contenders run WITHOUT a "
              f"memory limit; the page cache is only dropped before each one, so reads after the "
              f"first step may come from the cache", flush=True)
        return None


def reset_cgroup(path: Path | None) -> None:
    """Make the next contender start from an empty accounting (failcnt, max usage)."""
    if path is None:
        return
    for name in ("memory.max_usage_in_bytes", "memory.failcnt", "memory.force_empty", "memory.reclaim"):
        try:
            (path / name).write_text("0")
        except OSError:
            pass


def _max_usage(path: Path) -> int | None:
    for name in ("memory.max_usage_in_bytes", "memory.peak"):
        try:
            return int((path / name).read_text())
        except (OSError, ValueError):
            continue
    return None


# ---------------------------------------------------------------------------- children

def _child(spec: dict) -> dict:
    """Runs in the contender's process (already inside the cgroup)."""
    import torch

    torch.set_num_threads(spec["threads"])
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, spec["vocab"], (spec["batch"], spec["prompt"]), generator=gen)
    cuda = spec["device"].startswith("cuda")
    ids = ids.to(spec["device"])
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=spec["new_tokens"], do_sample=False,
                  pad_token_id=0)
    start = time.perf_counter()
    if spec["contender"] == "tierflow":
        import tierflow

        engine = tierflow.load(spec["model"], device=spec["device"], device_memory=spec["device_memory"],
                               host_memory=spec["host_memory"], nvme=spec["nvme"], trainable=False)
        loaded = time.perf_counter() - start
        out = engine.generate(ids, kv_cache=spec.get("kv_cache", "auto"), **kwargs)
        report = engine.last_generation
        steps = [s.seconds for s in report.steps]
        result = dict(steps=steps, nvme_read=[s.nvme_read for s in report.steps], kv_tier=report.kv_tier,
                      on_demand=[s.on_demand for s in report.steps],
                      placement={tier: sum(v.values()) for tier, v in engine.placement().items()},
                      budget_peaks={k: v[0] for k, v in engine.budget_peaks().items()})
        engine.close()
    else:
        from transformers import AutoModelForCausalLM

        options = dict(dtype=torch.float32)
        if spec["contender"] == "accelerate":
            offload = Path(spec["nvme"]) / "accelerate-offload"
            offload.mkdir(parents=True, exist_ok=True)
            memory = ({0: spec["device_memory"], "cpu": spec["host_memory"]} if cuda
                      else {"cpu": spec["weights_memory"]})
            options.update(device_map="auto", offload_folder=str(offload), max_memory=memory)
        elif cuda:
            options.update(device_map={"": 0})
        model = AutoModelForCausalLM.from_pretrained(spec["model"], **options).eval()
        loaded = time.perf_counter() - start
        steps = []
        sync = torch.cuda.synchronize if cuda else (lambda: None)

        def forward_starts(module, args):
            print_progress("forward")  # (read if the run is killed: see forward_seconds_at_least)
            steps.append(-time.perf_counter())

        def forward_ends(module, args, output):
            sync()
            steps[-1] += time.perf_counter()
            print_progress("done")
        model.register_forward_pre_hook(forward_starts)
        model.register_forward_hook(forward_ends)
        out = model.generate(ids, **kwargs)
        result = dict(steps=steps, device_map=_summarise_device_map(getattr(model, "hf_device_map", None)))
    result.update(load_s=loaded, tokens=out[:, spec["prompt"]:].tolist(), peak_rss=_peak_rss())
    return result


def forward_seconds_at_least(run: dict) -> float:
    """For a contender killed at its time-out: a lower bound of the summed forward times its
    generation would have had (the forwards completed, plus the one under way until the kill),
    from its PROGRESS lines; 0.0 if no forward had started."""
    seconds, started = 0.0, None
    for what, when in run.get("progress", ()):
        if what == "forward":
            started = when
        elif what == "done" and started is not None:
            seconds, started = seconds + when - started, None
    if started is not None:
        seconds += run["killed_at"] - started
    return seconds


def _summarise_device_map(device_map) -> dict | None:
    if not device_map:
        return None
    counts: dict = {}
    for where in device_map.values():
        counts[str(where)] = counts.get(str(where), 0) + 1
    return counts


def _peak_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_contender(spec: dict, cgroup: Path | None, timeout: float) -> dict:
    """Start a child for `spec` in `cgroup`, after dropping the page cache."""
    drop_caches()
    reset_cgroup(cgroup if spec["contender"] != "memory" else None)
    # Every contender waits passively in OpenMP barriers: on a shared machine libgomp's default
    # spinning lets other processes' load slow a contender's compute several times over
    # (measured: a 12-token prefill 4x slower), which would blur the comparison and the bound.
    group = str(cgroup / "cgroup.procs") if cgroup is not None and spec["contender"] != "memory" else None
    result = launch_in_cgroup("tierflow.bench.generate", "_main", spec, group, timeout,
                              env={"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")})
    if "error" in result:
        return result
    if cgroup is not None and spec["contender"] != "memory":
        usage = _max_usage(cgroup)
        if usage is not None:
            result["cgroup_max_usage"] = usage
    return result


# ---------------------------------------------------------------------------- the benchmark

def run_generate_bench(directory, hidden=1536, layers=12, intermediate=4096, vocab=8000, device="cpu",
                       device_memory="256MiB", host_memory="512MiB", limit=None, batches=(1, 16),
                       prompt=16, new_tokens=8, threads=2, json_path=None, timeout=900.0) -> list[dict]:
    """One cell: one model, one pair of budgets, one memory limit; every batch size."""
    from tierflow.config import parse_size

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    model_dir = directory / "model"
    model_bytes = build_model_dir(model_dir, model_config(hidden, layers, intermediate, vocab))
    device_b, host_b = parse_size(device_memory), parse_size(host_memory)
    limit_b = parse_size(limit) if limit else host_b + (device_b if device == "cpu" else 0) + 640 * MiB
    disk = disk_read_gbps(directory / "spill", threads if device == "cpu" else 0)
    rows, details = run_cell(directory, model_dir, model_bytes, vocab, device, device_b, host_b, limit_b, batches,
                             prompt, new_tokens, threads, disk, timeout)
    for r in rows:
        print_row(r)
    _print_notes(details)
    write_json(rows + [{"name": "details", **details}], json_path)
    return rows


def run_cell(directory: Path, model_dir: Path, model_bytes: int, vocab: int, device: str, device_b: int,
             host_b: int, limit_b: int, batches, prompt: int, new_tokens: int, threads: int, disk: dict,
             timeout: float) -> tuple[list[dict], dict]:
    """Run tierflow, accelerate and the in-memory reference at each batch size; (rows, details)."""
    from tierflow.config import format_size

    spill = directory / "spill"
    weights_memory = host_b + (device_b if device == "cpu" else 0)
    print(f"model: {format_size(model_bytes)} ({model_bytes / limit_b:.1f}x the memory limit of "
          f"{format_size(limit_b)}, page cache included); budgets: device {format_size(device_b)} on {device}, "
          f"host {format_size(host_b)}", flush=True)
    cgroup = make_cgroup(limit_b)
    rows, details = [], {"model_bytes": model_bytes, "limit": limit_b, "fio_read_gbps": disk["best"],
                         "disk": disk, "cgroup": cgroup is not None, "runs": {}}
    for batch in batches:
        base = dict(model=str(model_dir), vocab=vocab, batch=batch, prompt=prompt, new_tokens=new_tokens,
                    threads=threads, device=device, device_memory=device_b, host_memory=host_b,
                    nvme=str(spill), weights_memory=weights_memory)
        runs = {}
        for contender in ("tierflow", "accelerate", "memory"):
            shutil.rmtree(spill / "accelerate-offload", ignore_errors=True)
            print(f"batch {batch}: running {contender} ...", flush=True)
            before = disk_now(spill) if contender == "tierflow" else None
            runs[contender] = run_contender(dict(base, contender=contender), cgroup, timeout)
            if "error" in runs[contender]:
                print(f"  {contender} failed: {runs[contender]['error']}", flush=True)
            elif before is not None:
                after = disk_now(spill)
                if after is not None:
                    runs[contender]["disk_around"] = [before, after]
        details["runs"][batch] = runs
        rows += _rows(batch, runs, disk["best"], new_tokens)
    if cgroup is not None:
        try:
            cgroup.rmdir()
        except OSError:
            pass
    (spill / _NOW_FILE).unlink(missing_ok=True)
    return rows, details


_NOW_FILE = "fio-now.bin"


def disk_now(spill: Path, compute_threads: int = 0, size: int = 2 << 30) -> float | None:
    """The disk's read bandwidth now (GB/s): fio's matched job (4 threads of 16 MiB O_DIRECT
    reads, huge-page buffers when they can be reserved) over `size` bytes of a file kept for
    the next measurement, while `compute_threads` threads multiply matrices (0: none); None
    without fio. Taken around each tierflow run: over minutes this machine's disk drifts by
    more than the step target's margin (measured: 2.05 to 2.76 GB/s between the decode steps
    of one run; fio 2.40 to 3.06 between runs)."""
    fio = find_fio(install=False)
    if fio is None:
        return None
    spill.mkdir(parents=True, exist_ok=True)
    with huge_pages_for_fio(4 * 24 * MiB) as huge, _compute_load(compute_threads):
        job = fio_jobs(16 * MiB, 4, huge)[0]
        try:
            return fio_gbps(fio, job, spill, size, write=False, direct=True, file_name=_NOW_FILE)
        except (subprocess.CalledProcessError, ValueError, KeyError) as exc:
            print(f"WARNING: fio failed: {exc}", flush=True)
            return None


# Matrix-vector products over weights bigger than the caches, like a batched decode step's.
_BURNER = ("import sys, torch\n"
           "torch.set_num_threads(int(sys.argv[1]))\n"
           "w, x = torch.randn(8192, 1024), torch.randn(16, 1024)\n"
           "print('ready', flush=True)\n"
           "while True:\n"
           "    x @ w.T\n")


@contextlib.contextmanager
def _compute_load(threads: int):
    """A child process computing on `threads` threads for the duration (none when 0)."""
    if not threads:
        yield
        return
    child = subprocess.Popen([sys.executable, "-c", _BURNER, str(threads)], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    try:
        child.stdout.readline()  # "ready": torch imported, the weights made
        yield
    finally:
        child.kill()
        child.wait()


def disk_reference(run: dict, run_best: float | None) -> float | None:
    """The bandwidth a tierflow run's bound is taken at: the mean of the measurements right
    before and after it, else the run's first (best) fio figure."""
    around = run.get("disk_around")
    return sum(around) / len(around) if around else run_best


def disk_read_gbps(spill: Path, compute_threads: int = 0) -> dict:
    """The disk's sequential O_DIRECT read bandwidth (GB/s) on the spill file system, measured
    now: fio jobs shaped like tierflow's reads (4 threads of 16 MiB, in huge-page buffers when
    they can be reserved, and in 4 KiB pages) and libaio at queue depth 32; "best" is the
    highest (dd's when fio is missing). With `compute_threads`, also the matched job while
    that many threads multiply matrices ("fio_under_compute", not part of "best"): on a
    virtual machine the disk's emulation may share the CPUs that a decode step's compute uses."""
    fio = find_fio()
    if fio is None:
        gbps = _dd_read(spill)
        return {"best": gbps, "dd": gbps}
    spill.mkdir(parents=True, exist_ok=True)
    found = {}
    with huge_pages_for_fio(4 * 24 * MiB) as huge:  # a 16 MiB buffer per job, and slack
        for job in fio_jobs(16 * MiB, 4, huge):
            name = "fio" + (job.suffix or ("_huge_pages" if huge else "_4k_pages"))
            try:
                found[name] = fio_gbps(fio, job, spill, 1 << 30, write=False, direct=True)
            except (subprocess.CalledProcessError, ValueError, KeyError) as exc:
                print(f"WARNING: fio failed: {exc}", flush=True)
    (spill / FIO_FILE).unlink(missing_ok=True)
    best = max(found.values(), default=None)
    if compute_threads and found:
        # A pair of its own (same job, size and file, back to back): the jobs above ran over a
        # smaller file, a minute earlier, and the disk drifts.
        alone, under = disk_now(spill), disk_now(spill, compute_threads)
        if alone is not None and under is not None:
            found.update(fio_alone=alone, fio_under_compute=under)
    print("disk read (GB/s): " + ", ".join(f"{k} {v:.2f}" for k, v in found.items()), flush=True)
    return {"best": best, **found}


def _dd_read(spill: Path) -> float | None:
    """Without fio: dd's O_DIRECT sequential read of a 1 GiB file (one request at a time, a
    weaker reference than fio's)."""
    print("WARNING: fio is not available: the disk reference is dd (O_DIRECT, 8 MiB requests)", flush=True)
    spill.mkdir(parents=True, exist_ok=True)
    path = spill / "dd-bench.bin"
    try:
        subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=8M", "count=128", "oflag=direct"],
                       check=True, capture_output=True)
        drop_caches()
        start = time.perf_counter()
        subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=8M", "iflag=direct"], check=True, capture_output=True)
        return (1 << 30) / (time.perf_counter() - start) / GB
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"WARNING: dd failed ({exc}): no disk reference", flush=True)
        return None
    finally:
        path.unlink(missing_ok=True)


def _decode(run: dict) -> list[float]:
    return run["steps"][1:]


def _rows(batch: int, runs: dict, fio_gbps, new_tokens: int) -> list[dict]:
    tf, acc, mem = runs["tierflow"], runs["accelerate"], runs["memory"]
    rows = []
    tps = lambda run: batch * new_tokens / sum(run["steps"]) if "steps" in run else None  # noqa: E731
    if "steps" in tf:
        rows.append(row(f"tokens/s batch {batch} (vs accelerate)", tps(tf), tps(acc), "tokens/s"))
        step = statistics.median(_decode(tf))
        read = statistics.median(tf["nvme_read"][1:])
        disk = disk_reference(tf, fio_gbps)
        rows.append(row(f"read GB/s batch {batch} (vs fio)", read / step / GB, disk, "GB/s"))
        if disk and "steps" in mem:
            # The fastest in-memory step is the compute part of the bound (the machine is shared).
            bound = max(read / (disk * GB), min(_decode(mem)))
            rows.append(row(f"decode step / bound batch {batch}", step, bound, "s (ratio: step/bound, target <= 1.15)"))
        if "tokens" in acc:
            same = tf["tokens"] == acc["tokens"] == mem.get("tokens", tf["tokens"])
            rows.append(row(f"same greedy tokens batch {batch}", float(same), 1.0, "1 = yes"))
    return rows


def _print_notes(details: dict) -> None:
    for batch, runs in details["runs"].items():
        for name, run in runs.items():
            if "error" in run:
                print(f"batch {batch} {name}: {run['error']}")
                continue
            extra = ""
            if name == "tierflow":
                extra = (f", placement {json.dumps(run['placement'])}, KV cache {run['kv_tier']}, "
                         f"NVMe read per decode step {statistics.median(run['nvme_read'][1:]) / 2**20:.0f} MiB, "
                         f"fetches started on demand per decode step {run.get('on_demand', [0, None])[1:]}")
            elif run.get("device_map"):
                extra = f", device map {json.dumps(run['device_map'])}"
            usage = f", cgroup max usage {run['cgroup_max_usage'] / 2**20:.0f} MiB" if "cgroup_max_usage" in run else ""
            print(f"batch {batch} {name}: load {run['load_s']:.1f} s, prefill {run['steps'][0]:.2f} s, decode step "
                  f"median {statistics.median(_decode(run)):.3f} s, peak RSS {run['peak_rss'] / 2**20:.0f} MiB"
                  f"{usage}{extra}")


def _main(spec: str) -> None:
    print("RESULT " + json.dumps(_child(json.loads(spec))), flush=True)
