"""`tierflow bench scale`: step time and per-rank memory of 1 and of N data-parallel ranks.

Each world size is one `torchrun --nproc-per-node N` launch of this module's worker
(the same code a user runs), one after the other in one command, same model,
same per-rank batch (weak scaling: N ranks train N times the tokens per step).
Each rank reports its median step time, the state bytes it keeps per tier, its
accounted budget peaks and its peak RSS; the table compares N ranks with 1.

On a CUDA machine with one GPU, `--device cuda --ranks 1` runs the NCCL path:
with `--force-sharding` a single rank still shards (a world of one), so every
all-gather and reduce-scatter goes through NCCL.

    tierflow bench scale                               # 1 and 2 ranks, CPU, gloo
    tierflow bench scale --device cuda --ranks 1 --force-sharding
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tierflow.bench.report import print_row, row, write_json
from tierflow.dist.ranks import SINGLE_RANK_ENV as FORCE_ENV


def run_scale_bench(model: str = "llama-100m", ranks=(1, 2), steps: int = 6, warmup: int = 2,
                    batch_size: int = 1, seq_len: int = 256, device: str = "cpu", placement: str = "host",
                    nvme: str | None = None, force_sharding: bool = False, json_path=None) -> list[dict]:
    """Launch each world size with torchrun and compare; returns the comparison rows."""
    out_dir = Path(tempfile.mkdtemp(prefix="tierflow-scale-"))
    nvme = nvme or str(out_dir / "nvme")
    results = {}
    cores = os.cpu_count() or 1
    for world in ranks:
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // world))}
        if force_sharding:
            env[FORCE_ENV] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
               "--master-port", str(_free_port()), "-m", "tierflow.bench.scale", "--worker",
               "--model", model, "--steps", str(steps), "--warmup", str(warmup), "--batch-size", str(batch_size),
               "--seq-len", str(seq_len), "--device", device, "--placement", placement, "--nvme", nvme,
               "--out", str(out_dir / f"world{world}")]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{world} rank(s) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        reports = [json.loads(p.read_text()) for p in sorted((out_dir / f"world{world}").glob("rank*.json"))]
        results[world] = reports
        slowest = max(r["median_step_s"] for r in reports)
        tokens = world * batch_size * seq_len
        print(f"{world} rank(s) [{reports[0]['backend']}, {reports[0]['threads']} threads each, "
              f"{time.perf_counter() - start:.0f} s]: step {slowest:.3f} s, {tokens / slowest:,.0f} tokens/s; "
              f"per rank: state {_mib(reports[0]['state_bytes'])} MiB, peak RSS "
              f"{_mib(max(r['peak_rss'] for r in reports))} MiB, losses {reports[0]['losses']}")
        comm = reports[0].get("collectives_per_step")
        if comm:
            print(f"  collectives per step (rank 0): all-gather {_mib(comm['gathered_bytes'])} MiB received, "
                  f"{comm['gather_wait_s']:.3f} s waited by compute; reduce-scatter "
                  f"{_mib(comm['scattered_bytes'])} MiB, {comm['reduce_scatter_s']:.3f} s on the drain thread")
    rows = []
    base = results[ranks[0]]
    for world in ranks[1:]:
        step_base = max(r["median_step_s"] for r in base)
        step = max(r["median_step_s"] for r in results[world])
        rows.append(row(f"step_time_{world}_ranks_vs_{ranks[0]}", step, step_base, "s", False))
        rows.append(row(f"tokens_per_s_{world}_ranks_vs_{ranks[0]}", world * batch_size * seq_len / step,
                        ranks[0] * batch_size * seq_len / step_base, "tokens/s"))
        rows.append(row(f"state_bytes_per_rank_{world}_vs_{ranks[0]}", results[world][0]["state_bytes"],
                        base[0]["state_bytes"], "bytes", False))
        rows.append(row(f"peak_rss_per_rank_{world}_vs_{ranks[0]}", max(r["peak_rss"] for r in results[world]),
                        max(r["peak_rss"] for r in base), "bytes", False))
    for r in rows:
        print_row(r)
    write_json(rows, json_path)
    if json_path:  # the raw per-rank reports beside the rows
        Path(json_path).with_suffix(".ranks.json").write_text(json.dumps(results, indent=1) + "\n")
    return rows


def _worker(args) -> None:
    """One rank: train `steps` steps on its batch, record step times and memory."""
    import torch

    import tierflow
    from tierflow.bench.train import timed_step
    from tierflow.dist import ranks as distributed
    from tierflow.models import build_model

    distributed.init_from_env(args.device)
    rank, world = distributed.rank(), distributed.world_size()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    nvme = os.path.join(args.nvme, f"world{world}-rank{rank}")
    engine = tierflow.offload(build_model(args.model), device=args.device, placement=args.placement,
                              nvme=nvme if args.placement == "nvme" else None)
    opt = tierflow.AdamW(engine, lr=1e-4)
    gen = torch.Generator().manual_seed(1000 + rank)
    times, losses = [], []
    comm_before = None
    for step in range(args.steps):
        if step == args.warmup and engine.dist is not None:
            comm_before = dict(engine.dist.stats)
        ids = torch.randint(0, 256, (args.batch_size, args.seq_len), generator=gen).to(args.device)
        seconds, loss = timed_step(engine, opt, {"input_ids": ids, "labels": ids}, lambda: opt.clip_grad_norm_(1.0))
        losses.append(round(loss, 4))
        if step >= args.warmup:
            times.append(seconds)
    placement = engine.placement()
    state = sum(v for tier in placement.values() for k, v in tier.items() if k in ("master", "grads", "moments",
                                                                                    "weights"))
    report = {"rank": rank, "world": world, "median_step_s": statistics.median(times), "losses": losses,
              "state_bytes": state, "placement": placement, "budget_peaks": engine.budget_peaks(),
              "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else "none",
              "sharded": engine.dist is not None, "threads": torch.get_num_threads()}
    if comm_before is not None:  # per measured step: blocked seconds and bytes received
        measured = args.steps - args.warmup
        report["collectives_per_step"] = {k: (v - comm_before[k]) / measured for k, v in engine.dist.stats.items()}
    if args.device.startswith("cuda"):
        report["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    engine.close()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(report, indent=1) + "\n")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # tear down together (a gloo group destroyed early can abort a rank)
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="worker of `tierflow bench scale` (run under torchrun)")
    parser.add_argument("--worker", action="store_true", required=True)
    for flag, default in (("--model", "llama-100m"), ("--device", "cpu"), ("--placement", "host"),
                          ("--nvme", None), ("--out", None)):
        parser.add_argument(flag, default=default)
    for flag in ("--steps", "--warmup", "--batch-size", "--seq-len"):
        parser.add_argument(flag, type=int)
    _worker(parser.parse_args(argv))


if __name__ == "__main__":
    main()
