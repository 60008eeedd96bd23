"""Say before any work starts whether a model fits, where each tensor lives and how fast a step is.

Builds the model on the meta device (no memory is allocated for its weights),
splits it into units and places them exactly as `tierflow.offload` would, then
prints the bytes of every tensor class per tier with the budgets, the predicted
peak memory per tier and the predicted step time split into compute, transfer and
optimizer time with the bottleneck. Hardware figures come from the calibration
cached by `tierflow bench calibrate` (measured on first use, ~20 s).

If it does not fit, it says what is short and exits with status 1.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

HELP = "predict placement, peak memory and step time without allocating the model"
EXIT_DOES_NOT_FIT = 1
_ROWS = ("weights", "master", "grads", "moments", "activations", "buffers", "working", "staging")
_TIERS = ("device", "host", "nvme")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llama-100m", metavar="NAME|PATH",
                        help="built-in name (llama-100m, llama-tiny, gpt2-tiny) or a local Hugging Face "
                             "model directory (default: llama-100m)")
    parser.add_argument("--device", default="cpu", metavar="DEVICE", help="compute device: cpu or cuda")
    parser.add_argument("--device-memory", default=None, metavar="SIZE", help="device budget (default: no limit)")
    parser.add_argument("--host-memory", default=None, metavar="SIZE", help="host budget (default: no limit)")
    parser.add_argument("--nvme", default=None, metavar="DIR", help="NVMe spill directory (default: none)")
    parser.add_argument("--dtype", default=None, metavar="DTYPE", help="compute dtype (default: the model's)")
    parser.add_argument("--placement", default="auto", choices=("auto", "greedy", "device", "host", "nvme"),
                        help="auto (the fastest predicted plan, as tierflow.offload), greedy (nearest tier first), or "
                             "device, host or nvme to force every unit's state into that tier (default: auto)")
    parser.add_argument("--batch-size", type=int, default=1, metavar="N", help="sequences per step (default 1)")
    parser.add_argument("--seq-len", type=int, default=256, metavar="N", help="tokens per sequence (default 256)")
    parser.add_argument("--world-size", type=int, default=1, metavar="N",
                        help="data-parallel ranks sharing the state (torchrun --nproc-per-node x nodes); the "
                             "plan is per rank, --batch-size per rank (default 1)")
    parser.add_argument("--link-bandwidth", default="25GB", metavar="SIZE",
                        help="bytes per second one rank sends over the network in collectives (default 25GB: "
                             "200 Gb/s InfiniBand per GPU)")
    parser.add_argument("--unit-bytes", default=None, metavar="SIZE",
                        help="target parameter bytes per unit (the piece that moves as one; default: from the budgets)")
    parser.add_argument("--weights", default=None, choices=("int8", "int4"),
                        help="frozen weights kept compressed (int8, or int4 = NF4): plans a frozen model "
                             "(inference) with their compressed bytes (default: uncompressed)")
    parser.add_argument("--frozen", action="store_true",
                        help="plan a frozen model, as tierflow.load(..., trainable=False) and tierflow generate "
                             "hold it (inference: no gradients or moments)")
    parser.add_argument("--recalibrate", action="store_true", help="measure the machine again")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the plan as JSON")


def run(args: argparse.Namespace) -> int:
    """`tierflow plan`: 0 when it fits, 1 when it does not."""
    from tierflow.bench.calibrate import get_calibration
    from tierflow.cli.messages import for_cli
    from tierflow.config import OffloadConfig, parse_dtype, parse_size
    from tierflow.core.planner import predict
    from tierflow.errors import BudgetError, ConfigError

    _check_json_path(getattr(args, "json", None))  # said before planning, not after
    model = meta_model(args.model)
    weights = getattr(args, "weights", None)
    if weights is not None or getattr(args, "frozen", False):
        model.requires_grad_(False)  # (compressed weights are frozen ones): the plan of an inference engine
    cfg = OffloadConfig.create(device=args.device, device_memory=_limit(args.device_memory),
                               host_memory=_limit(args.host_memory), nvme=args.nvme, dtype=parse_dtype(args.dtype),
                               unit_bytes=args.unit_bytes, weights=weights)
    if args.batch_size < 1 or args.seq_len < 1 or args.world_size < 1:
        raise ConfigError("--batch-size, --seq-len and --world-size must be at least 1")
    link_bps = float(parse_size(args.link_bandwidth, what="--link-bandwidth"))
    if link_bps <= 0:
        raise ConfigError("--link-bandwidth must be positive")
    dtype = cfg.dtype or next(model.parameters()).dtype
    cal, cached = get_calibration(str(cfg.device), dtype, args.nvme, args.recalibrate,
                                  log=lambda text: print(f"calibrating this machine (once): {text}", flush=True))
    try:
        pred = predict(model, cfg, cal, args.batch_size, args.seq_len, args.placement, args.world_size, link_bps)
    except (BudgetError, ConfigError) as exc:
        short = shortfall(model, cfg, cal, args, str(exc))
        print(f"does not fit: {for_cli(short, vars(args))}")
        _write_json(args.json, {"fits": False, "short": short, "placement": None, "peak_bytes": None,
                                "predicted_step_s": None, "bottleneck": None})
        return EXIT_DOES_NOT_FIT
    report = as_json(pred, cfg, args)
    report["experts"] = experts_report(model, pred.compute_dtype, args.batch_size)
    disk_short = _disk_short(cfg, report["peak_bytes"]["nvme"])
    report["fits"] = disk_short is None
    print_report(pred, cfg, args, _param_count(model), cached)
    if report["experts"]:
        print(describe_experts(report["experts"]))
    if disk_short:
        report["short"] = disk_short
        print(f"does not fit: {disk_short}")
    _write_json(args.json, report)
    return 0 if report["fits"] else EXIT_DOES_NOT_FIT


def meta_model(name_or_path: str):
    """The causal LM of a built-in name or local directory, with every tensor on the meta device."""
    import warnings

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tierflow.models import model_dir, builtin_config, is_builtin

    if is_builtin(name_or_path):
        config = builtin_config(name_or_path)
    else:
        config = AutoConfig.from_pretrained(str(model_dir(name_or_path)), local_files_only=True)
    dtype = config.dtype if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and not is_builtin(name_or_path):
        model = model.to(dtype)
    return model


def shortfall(model, cfg, cal, args, message: str) -> str:
    """What is short, in the command's own terms: the extra host memory when state overflows
    the host budget without NVMe; otherwise the planner's own message."""
    from dataclasses import replace

    from tierflow.config import format_size
    from tierflow.core.planner import predict
    from tierflow.errors import TierflowError

    if cfg.host_memory is None or cfg.nvme is not None or args.placement in ("device", "nvme"):
        return message
    try:
        need = predict(model, replace(cfg, host_memory=None), cal, args.batch_size, args.seq_len, args.placement)
    except TierflowError:
        return message
    extra = need.peaks["host"] - cfg.host_memory
    return (f"needs {format_size(extra)} more host memory (--host-memory {format_size(cfg.host_memory + extra)}"
            f"), or --nvme DIR to spill the rest to disk")


def as_json(pred, cfg, args) -> dict:
    """The plan as JSON-ready data (bytes as integers, seconds as floats)."""
    step = pred.step
    units = [{"name": u.name, "home": h, "numel": u.numel} for u, h in zip(pred.units, pred.placement.homes)]
    return {
        "model": args.model,
        "compute_dtype": str(pred.compute_dtype).removeprefix("torch."),
        "placement": {"bytes": pred.table, "budgets": _budgets(cfg), "units": units,
                      "homes": {t: pred.placement.homes.count(t) for t in _TIERS},
                      "variant": asdict(pred.placement.variant),
                      "prefetch_bytes": pred.placement.prefetch_bytes,
                      "gpu_updates": sum(pred.placement.device_updates)},
        "peak_bytes": pred.peaks,
        "predicted_step_s": step.step_s,
        "step": {"compute_s": step.compute_s, "transfer_s": step.transfer_s, "optimizer_s": step.optimizer_s,
                 "forward_s": step.forward_s, "backward_s": step.backward_s},
        "bottleneck": step.bottleneck,
        "tokens_per_step": pred.work.tokens * pred.world_size,
        "world_size": pred.world_size,
        "collective_bytes_per_rank": pred.collectives,
        "collective_s": step.collective_s,
    }


def print_report(pred, cfg, args, n_params: int, cached: bool = True) -> None:
    """The table of bytes per class and tier, peaks and the step-time prediction."""
    from rich.console import Console
    from rich.table import Table

    from tierflow.config import format_size

    console = Console()
    console.print(f"[bold]model[/] {args.model}: {n_params / 1e6:.1f} M parameters, compute dtype "
                  f"{str(pred.compute_dtype).removeprefix('torch.')}, {len(pred.units)} units; batch "
                  f"{args.batch_size}x{args.seq_len}"
                  + (f"; frozen weights compressed as {cfg.weights} (a plan for inference)" if cfg.weights else ""),
                  soft_wrap=True, highlight=False)
    table = Table(title="placement (bytes per tier)", title_justify="left")
    table.add_column("tensors")
    for tier in _TIERS:
        table.add_column(tier, justify="right")
    for row in _ROWS:
        values = [pred.table[tier].get(row, 0) for tier in _TIERS]
        if any(values):
            table.add_row(row, *[format_size(v) if v else "-" for v in values])
    budgets = _budgets(cfg)
    table.add_row("[bold]predicted peak", *[format_size(pred.peaks[t]) for t in _TIERS], end_section=True)
    table.add_row("[bold]budget", *[_budget_text(budgets[t]) for t in _TIERS])
    console.print(table)
    if cfg.activations is None:
        console.print("activations are an estimate and lie outside the device budget (left to autograd: "
                      "`tierflow train --activations auto` keeps them inside); predicted peaks are the engine's accounted "
                      "bytes (budget_peaks)", style="dim", soft_wrap=True)
    else:
        console.print(f"activations are managed inside the device budget (activations={cfg.activations!r}: "
                      f"half of the room the working set leaves is theirs); predicted peaks are the engine's "
                      f"accounted bytes (budget_peaks)", style="dim", soft_wrap=True)
    step = pred.step
    if pred.world_size > 1:
        moved = pred.collectives
        console.print(f"[bold]data parallel[/] {pred.world_size} ranks: the table is one rank's share (1/"
                      f"{pred.world_size} of the state); per rank and step the collectives move "
                      f"{format_size(moved['all_gather'])} (weight all-gathers, forward and backward) + "
                      f"{format_size(moved['reduce_scatter'])} (gradient reduce-scatter), "
                      f"{step.collective_s:.3f} s at --link-bandwidth {args.link_bandwidth}/s",
                      soft_wrap=True, highlight=False)
    console.print(describe_choice(pred.placement), soft_wrap=True, highlight=False)
    tokens = pred.world_size * pred.work.tokens / step.step_s if step.step_s else 0.0
    console.print(f"[bold]predicted step[/] {step.step_s:.3f} s ({tokens:,.0f} tokens/s): compute "
                  f"{step.compute_s:.3f} s, transfer {step.transfer_s:.3f} s, optimizer {step.optimizer_s:.3f} s "
                  f"(each alone; they overlap); bottleneck: [bold]{step.bottleneck}[/]"
                  + ("" if cached else " (calibrated now, cached for next time)"), soft_wrap=True,
                  highlight=False)


def experts_report(model, dtype, batch: int) -> dict | None:
    """A mixture of experts' figures: its experts, and the expert bytes a decode step of `batch`
    tokens reads when the experts are fetched as the router picks them (core/moe.py)."""
    from tierflow.core.moe import moe_shape

    shape = moe_shape(model, dtype)
    if shape is None:
        return None
    return {"layers": shape.layers, "experts": shape.experts, "top_k": shape.top_k,
            "expert_bytes": shape.expert_bytes, "experts_total_bytes": shape.total_bytes,
            "experts_per_layer_per_decode_step": shape.experts_per_step(batch),
            "routed_bytes_per_decode_step": int(shape.routed_bytes(batch))}


def describe_experts(report: dict) -> str:
    from tierflow.config import format_size

    used = report["experts_per_layer_per_decode_step"]
    return (f"mixture of experts: {report['layers']} layers x {report['experts']} experts (top-{report['top_k']}), "
            f"{format_size(report['experts_total_bytes'])} of experts; for inference (trainable=False) a decode "
            f"step reads only the routed ones: ~{used:.1f} experts per layer, "
            f"~{format_size(report['routed_bytes_per_decode_step'])} per step "
            f"({report['routed_bytes_per_decode_step'] / report['experts_total_bytes']:.0%} of the experts; "
            f"cache hits read nothing; docs/moe.md)")


def describe_choice(plan) -> str:
    """One line on how the planner spent the budgets (planner.py)."""
    from tierflow.config import format_size
    from tierflow.core.plan import GREEDY

    variant = plan.variant
    how = "nearest tier first, in model order" if variant == GREEDY else (
        f"{variant.order} claim order, {variant.device_state:.0%} of the free device room for state, "
        f"prefetch window x{variant.prefetch_scale:g}")
    line = f"[bold]plan[/] {how}; prefetch window {format_size(plan.prefetch_bytes)}"
    if plan.device_updates:
        line += f"; AdamW of {sum(plan.device_updates)} host/NVMe units on the GPU"
    return line


def _budgets(cfg) -> dict:
    from tierflow.core.plan import device_capacity

    return {"device": device_capacity(cfg), "host": cfg.host_memory,
            "nvme": str(cfg.nvme) if cfg.nvme is not None else None}


def _budget_text(value) -> str:
    from tierflow.config import format_size

    if value is None:
        return "unlimited"
    return format_size(value) if isinstance(value, int) else "disk"


def _disk_short(cfg, nvme_bytes: int) -> str | None:
    """A message when the NVMe directory's file system lacks room for the spill file."""
    if not nvme_bytes or cfg.nvme is None:
        return None
    from tierflow.config import format_size

    path = Path(cfg.nvme).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    stat = os.statvfs(path)
    free = stat.f_bavail * stat.f_frsize
    if free >= nvme_bytes:
        return None
    return (f"needs {format_size(nvme_bytes - free)} more free disk space in {cfg.nvme} "
            f"({format_size(nvme_bytes)} spilled, {format_size(free)} free), or more --host-memory")


def _param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _limit(size: str | None) -> str | None:
    return None if size is None or size.strip().lower() in ("none", "unlimited") else size


def _check_json_path(path: str | None) -> None:
    """--json FILE must be writable where it is asked for: its directory exists and is one."""
    from tierflow.errors import ConfigError

    if not path:
        return
    file = Path(path)
    if file.is_dir():
        raise ConfigError(f"--json {path} is a directory: give the path of a file to write, e.g. {file / 'plan.json'}")
    parent = file.parent
    if not parent.is_dir():
        raise ConfigError(f"--json {path}: directory {parent} does not exist; create it or write the file elsewhere")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--json {path}: directory {parent} is not writable; write the file elsewhere")


def _write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2) + "\n")
