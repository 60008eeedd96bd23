"""`tierflow bench train`: step time of tierflow against plain PyTorch, same model and data.

Three contenders train the same model (same seed, same batches) in one process, each
its steps in one block: a tierflow step's AdamW runs lazily, overlapped with the next forward,
so interleaving the contenders step by step would move that work into another contender's
timed step. Each step after the first then carries the previous step's update, as in training,
and the work left pending after a tierflow block is settled (untimed) before the next block:

* `torch`: plain PyTorch, everything in memory, `torch.optim.AdamW(fused=True)`;
* `tierflow-memory`: tierflow with every unit's state in device memory;
* `tierflow-nvme`: tierflow with the given budgets, state spilling to NVMe.

It prints the median step time of each and the ratios, the bytes each tier moves
per step, and how close the NVMe run is to its physical bound
max(compute time, NVMe bytes / disk bandwidth).
"""
from __future__ import annotations

import statistics
import tempfile
import time

import torch

import tierflow
from tierflow.bench.report import print_row, row, write_json
from tierflow.models import build_model


def timed_step(model, opt, batch, clip) -> tuple[float, float]:
    """(seconds, loss) of one training step: forward, backward, clip, AdamW, zero_grad; the
    loss read at the end waits for the device. `batch` holds the model's keyword arguments."""
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    clip()
    opt.step()
    opt.zero_grad()
    loss = loss.item()  # waits for the device
    return time.perf_counter() - start, loss


def run_train_bench(model_name: str = "llama-100m", steps: int = 6, warmup: int = 2, seq_len: int = 256,
                    device_memory: str = "256MiB", host_memory: str = "512MiB", nvme: str | None = None,
                    disk_gbps: float | None = None, json_path=None, device: str = "cpu") -> list[dict]:
    """Run the three contenders and return the comparison rows."""
    nvme = nvme or tempfile.mkdtemp(prefix="tierflow-bench-")
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": ids.to(device), "labels": ids.to(device)}
               for ids in (torch.randint(0, 256, (1, seq_len), generator=gen) for _ in range(steps))]

    plain = build_model(model_name).to(device)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-4, fused=True)
    params = sum(p.numel() for p in plain.parameters())
    contenders = {"torch": (plain, plain_opt, lambda: torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0))}
    for name, kwargs in (("tierflow-memory", dict(placement="device")),
                         ("tierflow-nvme", dict(device_memory=device_memory, host_memory=host_memory, nvme=nvme))):
        engine = tierflow.offload(build_model(model_name), device=device, **kwargs)
        opt = tierflow.AdamW(engine, lr=1e-4)
        contenders[name] = (engine, opt, lambda o=opt: o.clip_grad_norm_(1.0))
    nvme_engine = contenders["tierflow-nvme"][0]
    print(f"model {model_name}: {params / 1e6:.1f} M parameters, training state "
          f"{tierflow.format_size(16 * params)}; batch 1x{seq_len}; tierflow-nvme budgets: device "
          f"{device_memory}, host {host_memory}; homes: "
          + ", ".join(f"{h} {nvme_engine.plan.homes.count(h)}" for h in ("device", "host", "nvme")))

    times = {name: [] for name in contenders}
    losses = {name: [] for name in contenders}
    io_before = io_after = None
    for name, (model, opt, clip) in contenders.items():
        for i, batch in enumerate(batches):
            if i == warmup and model is nvme_engine:
                io_before = nvme_engine.io_stats()
            seconds, loss = timed_step(model, opt, batch, clip)
            losses[name].append(loss)
            if i >= warmup:
                times[name].append(seconds)
        if model is nvme_engine:
            io_after = nvme_engine.io_stats()
        if isinstance(model, tierflow.Engine):
            model.flush()  # the last step's update, before the next contender's block
    measured = steps - warmup
    per_step = {k: (io_after[k] - io_before[k]) / measured for k in io_after}
    median = {name: statistics.median(t) for name, t in times.items()}
    for name in contenders:
        print(f"{name:<16} median step {median[name]:.2f} s  losses {['%.3f' % x for x in losses[name]]}")
    print("bytes per step (tierflow-nvme): " + ", ".join(
        f"{k} {tierflow.format_size(v)}" for k, v in per_step.items()))

    rows = [row("step_time_memory_vs_torch", median["tierflow-memory"], median["torch"], "s", False),
            row("step_time_nvme_vs_torch", median["tierflow-nvme"], median["torch"], "s", False)]
    if disk_gbps:
        io_bound = (per_step["nvme_read"] + per_step["nvme_written"]) / (disk_gbps * 1e9)
        bound = max(median["torch"], io_bound)
        rows.append(row("step_time_nvme_vs_physical_bound", median["tierflow-nvme"], bound, "s", False))
    for r in rows:
        print_row(r)
    write_json(rows, json_path)
    for model, _, _ in contenders.values():
        if isinstance(model, tierflow.Engine):
            model.close()
    return rows
