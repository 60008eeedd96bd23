"""``tierflow bench generate --matrix``: the generation benchmark over a matrix of cells.

Every cell runs tierflow, accelerate and the in-memory reference side by side under one
memory limit (page cache included) with a cold page cache (generate.py); the cells vary

* the model: `factors` times the memory limit (a Llama of `hidden`/`intermediate` width
  whose layer count gives that size),
* the budgets: pairs of (device, host) budgets, from tight to roomy,
* the batch: every size of `batches`.

The disk's read bandwidth is measured at the start of the run (fio's jobs, the best one
reported) and right before and after each tierflow run (the matched job; the bound takes
the mean of those two: this machine's disk drifts by more than the target's margin within
minutes). Every cell reports its decode step against the bound max(in-memory compute of the
step, bytes read per step / that bandwidth), and its tokens/s against accelerate's. An
accelerate run that does not finish within the time-out gives a lower bound of the ratio
(its tokens/s is below batch x new tokens / time-out). A summary table closes the run, with
the targets: step <= 1.15x the bound, tokens/s >= 1.5x accelerate's.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from tierflow.bench.generate import (build_model_dir, disk_read_gbps, disk_reference, forward_seconds_at_least,
                                     model_config, run_cell)
from tierflow.bench.report import write_json

STEP_TARGET = 1.15    # decode step / physical bound, at most
SPEEDUP_TARGET = 1.5  # tokens/s against accelerate's, at least
GB = 1e9


def layers_for(factor: float, limit: int, hidden: int, intermediate: int, vocab: int) -> int:
    """Decoder layers that make a fp32 Llama of this shape about `factor` x `limit` bytes."""
    per_layer = 4 * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden)
    rest = 4 * (2 * vocab * hidden + hidden)
    return max(1, round((factor * limit - rest) / per_layer))


def run_generate_matrix(directory, limit="768MiB", factors=(2, 4, 8), budgets=(("64MiB", "96MiB"), ("128MiB", "224MiB")),
                        batches=(1, 16), hidden=1024, intermediate=2816, vocab=8000, prompt=12, new_tokens=8,
                        threads=2, json_path=None, timeout=1800.0) -> list[dict]:
    from tierflow.config import parse_size

    directory = Path(directory).absolute()
    limit_b = parse_size(limit)
    disk = disk_read_gbps(directory / "spill", threads)
    cells = []
    for factor in factors:
        layers = layers_for(factor, limit_b, hidden, intermediate, vocab)
        model_dir = directory / f"model-{factor}x"
        model_bytes = build_model_dir(model_dir, model_config(hidden, layers, intermediate, vocab))
        for device_memory, host_memory in budgets:
            device_b, host_b = parse_size(device_memory), parse_size(host_memory)
            print(f"\n=== model {factor}x the limit ({layers} layers), budgets {device_memory} + {host_memory}",
                  flush=True)
            rows, details = run_cell(directory, model_dir, model_bytes, vocab, "cpu", device_b, host_b, limit_b,
                                     batches, prompt, new_tokens, threads, disk, timeout)
            cells += [cell_summary(factor, model_bytes, device_memory, host_memory, batch, runs, disk["best"],
                                   new_tokens) for batch, runs in details["runs"].items()]
            write_json(cells, json_path)  # after every cell: a long run keeps what it measured
    print_summary(cells, limit, disk)
    return cells


def cell_summary(factor, model_bytes: int, device_memory: str, host_memory: str, batch: int, runs: dict,
                 disk_gbps, new_tokens: int) -> dict:
    """One line of the summary: the figures of one cell at one batch size. `disk_gbps`: the
    run's first fio figure (the bound's reference where tierflow's run has none of its own)."""
    tf, acc, mem = runs["tierflow"], runs["accelerate"], runs["memory"]
    cell = dict(factor=factor, model_gb=model_bytes / GB, device=device_memory, host=host_memory, batch=batch)
    for name, run in (("tierflow", tf), ("accelerate", acc), ("memory", mem)):
        if "error" in run:
            cell[f"{name}_error"] = run["error"]
    if "steps" not in tf:
        return cell
    step = statistics.median(tf["steps"][1:])
    read = statistics.median(tf["nvme_read"][1:])
    cell.update(step_s=step, read_gb=read / GB, read_gbps=read / step / GB,
                tierflow_tps=batch * new_tokens / sum(tf["steps"]), cgroup_peak=tf.get("cgroup_max_usage"))
    disk = disk_reference(tf, disk_gbps)
    if "steps" in mem and disk:
        cell.update(disk_gbps=disk, compute_s=min(mem["steps"][1:]), io_s=read / (disk * GB))
        cell["bound_s"] = max(cell["compute_s"], cell["io_s"])
        cell["step_over_bound"] = step / cell["bound_s"]
        if disk_gbps:  # the same step against the run's first (best) fio figure, for reference
            cell["step_over_run_best_bound"] = step / max(cell["compute_s"], read / (disk_gbps * GB))
    if "steps" in acc:
        cell["accelerate_tps"] = batch * new_tokens / sum(acc["steps"])
        cell["speedup"] = cell["tierflow_tps"] / cell["accelerate_tps"]
        cell["accelerate_step_s"] = statistics.median(acc["steps"][1:])
        cell["same_tokens"] = tf["tokens"] == acc["tokens"] == mem.get("tokens", tf["tokens"])
    elif acc.get("timed_out"):
        # Killed at its time-out: its forwards (tokens/s counts forward time only, loading not)
        # took at least the completed ones plus the one under way: fewer tokens/s than this.
        forwards = forward_seconds_at_least(acc)
        if forwards > 0:
            cell["accelerate_tps_below"] = batch * new_tokens / forwards
            cell["speedup_above"] = cell["tierflow_tps"] / cell["accelerate_tps_below"]
        if "tokens" in mem:
            cell["same_tokens"] = tf["tokens"] == mem["tokens"]  # against the model in memory alone
    return cell


def meets_targets(cell: dict) -> bool:
    """Both targets met, with greedy tokens equal to the model's in memory. An accelerate run
    that timed out counts when the lower bound of the ratio meets the target."""
    step_met = cell.get("step_over_bound", float("inf")) <= STEP_TARGET
    speedup = cell.get("speedup", cell.get("speedup_above", 0))
    return step_met and speedup >= SPEEDUP_TARGET and cell.get("same_tokens", False)


def print_summary(cells: list[dict], limit: str, disk: dict) -> None:
    best = disk.get("best")
    print(f"\nsummary: memory limit {limit} (page cache included), cold cache; disk read "
          f"{best:.2f} GB/s at the start (best fio job); 'disk': fio right before and after each tierflow "
          f"run, the bound's reference" if best else "\nsummary: no disk reference")
    if "fio_under_compute" in disk:
        print(f"         the matched fio job at the start: {disk['fio_alone']:.2f} GB/s alone, "
              f"{disk['fio_under_compute']:.2f} while torch computes on the contenders' threads")
    print(f"{'model':>14} {'budgets':>15} {'batch':>5} {'read/step':>9} {'step':>7} {'compute':>7} {'disk':>5} "
          f"{'io':>7} {'step/bound':>10} {'(at start)':>10} {'tok/s':>7} {'acc tok/s':>9} {'vs acc':>7} {'same':>5} "
          f"{'targets':>7}")
    for c in cells:
        if "step_s" not in c:
            print(f"{c['factor']:>4}x {c['model_gb']:6.2f} GB {c['device'] + '+' + c['host']:>15} {c['batch']:>5}  "
                  f"failed: {c.get('tierflow_error')}")
            continue
        fmt = lambda key, spec: format(c[key], spec) if c.get(key) is not None else "-"  # noqa: E731
        acc_tps, vs = fmt("accelerate_tps", "9.2f"), fmt("speedup", "6.2f") + "x"
        if "speedup_above" in c:
            acc_tps, vs = f"<{c['accelerate_tps_below']:8.3f}", f">{c['speedup_above']:5.1f}x"
        print(f"{c['factor']:>4}x {c['model_gb']:6.2f} GB {c['device'] + '+' + c['host']:>15} {c['batch']:>5} "
              f"{fmt('read_gb', '7.2f')}GB {fmt('step_s', '7.3f')} {fmt('compute_s', '7.3f')} {fmt('disk_gbps', '5.2f')} "
              f"{fmt('io_s', '7.3f')} {fmt('step_over_bound', '9.2f')}x {fmt('step_over_run_best_bound', '9.2f')}x "
              f"{fmt('tierflow_tps', '7.2f')} {acc_tps:>9} {vs:>7} {str(c.get('same_tokens', '-')):>5} "
              f"{'met' if meets_targets(c) else 'MISSED':>7}")
