"""`tierflow bench gpu`: the 1 B-class run of the NaN report, tierflow against plain PyTorch.

The model of the report (Llama, hidden 2048, 16 layers, intermediate 5504, 32 heads, vocab
32000, untied embeddings: 0.94 B parameters), bf16, batch 4x1024, 20 steps, trained by

* `torch`: fp32 weights on the GPU, autocast bf16, fused AdamW, clip 1.0 (the reference);
* `tierflow-host`: device budget 4 GiB, host 64 GiB (the report's settings);
* `tierflow-nvme`: device 4 GiB, host 8 GiB, the rest in NVMe files,

from the same initial weights (built once, on the GPU, with a seed) on the same batches,
nothing read back to the host inside the loop. Criteria, each PASS or FAIL: the reference's
losses are finite; every contender ran; every tierflow loss is finite and within `rtol`
(1e-2 for bf16) relative of torch's. Also reported: every loss, step times (CUDA events),
peak GPU memory, homes, bytes moved per step.

`--cpu-smoke` runs the same code on the CPU with a tiny model in seconds; `--fault nan|diverge`
corrupts the tierflow runs' logits on purpose, to show the checker fails when it should.
"""
from __future__ import annotations

import json
import math
import platform
import shutil
import tempfile
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

import torch

from tierflow.bench import gpu

PRESETS = {
    "1b": dict(shape=gpu.ONE_B, batch=4, seq_len=1024, steps=20, device="cuda",
               budgets={"tierflow-host": dict(device_memory="4GiB", host_memory="64GiB"),
                        "tierflow-nvme": dict(device_memory="4GiB", host_memory="8GiB")}),
    # Tiny units and budgets, so that the tiny model still streams and spills to NVMe files.
    "cpu-smoke": dict(shape=gpu.TINY, batch=2, seq_len=32, steps=4, device="cpu",
                      budgets={"tierflow-host": dict(device_memory="192KiB", host_memory="64MiB", unit_bytes="16KiB"),
                               "tierflow-nvme": dict(device_memory="192KiB", host_memory="1MiB", unit_bytes="16KiB",
                                                     chunk_bytes="64KiB")}),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LOSS_RTOL = {"bf16": 1e-2, "fp32": 1e-4}


def criterion(name: str, value, limit, passed: bool) -> dict:
    return {"name": name, "value": value, "limit": limit, "passed": bool(passed)}


def run_summary(result: gpu.RunResult) -> dict:
    """A contender's JSON-able figures (no weights)."""
    out = asdict(replace(result, state=None))
    out.pop("state")
    out["median_step_s"] = gpu.median_after_warmup(result.step_s)
    out["nonfinite_losses"] = sum(not math.isfinite(x) for x in result.losses)
    return out


def judge(report: dict, rtol: float) -> list[dict]:
    """PASS/FAIL per criterion from the runs recorded so far."""
    runs = report["runs"]
    ref = runs.get("torch")
    checks = [criterion("model and batches built", report["error"], "no error", False)] if "error" in report else []
    checks += [criterion("torch: reference ran, losses finite", None if ref is None else ref["nonfinite_losses"], 0,
                        ref is not None and "error" not in ref and ref["nonfinite_losses"] == 0)]
    for name in report["config"]["contenders"]:
        run = runs.get(name)
        if run is None or "error" in run:
            checks.append(criterion(f"{name}: ran", run and run.get("error"), "no error", False))
            continue
        checks.append(criterion(f"{name}: no NaN/inf loss", run["nonfinite_losses"], 0, run["nonfinite_losses"] == 0))
        worst = gpu.max_relative_difference(run["losses"], ref["losses"]) if ref and "losses" in ref else math.inf
        run["max_rel_loss_diff"] = worst
        checks.append(criterion(f"{name}: every loss within rtol of torch", worst, rtol, worst <= rtol))
    return checks


def _attempt(name: str, report: dict, fn) -> gpu.RunResult | None:
    """Run one contender; an exception fails that contender, not the whole check."""
    print(f"[{time.strftime('%H:%M:%S')}] running {name} ...", flush=True)
    try:
        result = fn()
    except KeyboardInterrupt:  # the script's time limit (SIGINT): record it, stop the run
        report["runs"][name] = {"name": name, "error": "interrupted (time limit or Ctrl-C)"}
        raise
    except Exception as exc:  # noqa: BLE001 -- recorded as a FAIL, the other contenders still run
        traceback.print_exc()
        report["runs"][name] = {"name": name, "error": f"{type(exc).__name__}: {exc}"}
        return None
    report["runs"][name] = run_summary(result)
    print(f"  {name}: losses {[round(x, 4) for x in result.losses]}", flush=True)
    return result


def run_gpu_check(preset: str = "1b", shape: gpu.ModelShape | None = None, batch: int | None = None,
                  seq_len: int | None = None, steps: int | None = None, device: str | None = None,
                  dtype: str = "bf16", lr: float = 1e-4, seed: int = 0, lag_ms: float = 0.0,
                  contenders=("tierflow-host", "tierflow-nvme"), nvme: str | None = None, fault: str = "none",
                  json_path=None) -> dict:
    """Run torch and the tierflow contenders; returns the report (see the module docstring).
    The JSON file, if given, is rewritten after every contender, so a run cut short leaves
    what it had measured."""
    p = PRESETS[preset]
    shape, batch, seq_len = shape or p["shape"], batch or p["batch"], seq_len or p["seq_len"]
    steps, device = steps or p["steps"], device or p["device"]
    own_nvme = nvme is None
    nvme_dir = Path(nvme or tempfile.mkdtemp(prefix="tierflow-gpu-check-", dir="/tmp"))
    report = {"config": dict(preset=preset, shape=asdict(shape), batch=batch, seq_len=seq_len, steps=steps,
                             device=device, dtype=dtype, lr=lr, seed=seed, lag_ms=lag_ms, fault=fault,
                             contenders=list(contenders), budgets={c: p["budgets"][c] for c in contenders},
                             nvme=str(nvme_dir), machine=machine_description(device)),
              "runs": {}, "criteria": [], "passed": False}

    def save():
        report["criteria"] = judge(report, LOSS_RTOL[dtype])
        report["passed"] = all(c["passed"] for c in report["criteria"])
        if json_path:
            Path(json_path).write_text(json.dumps(report, indent=2, default=str) + "\n")

    try:
        start = time.perf_counter()
        initial = gpu.build_initial_model(shape, seed, device, max_positions=max(seq_len, 2048))
        batches = gpu.make_batches(steps, batch, seq_len, shape.vocab, device, seed=seed + 1)
        report["config"]["build_s"] = time.perf_counter() - start
        _attempt("torch", report, lambda: gpu.run_torch(initial, batches, device, DTYPES[dtype], lr, lag_ms))
        save()
        for name in contenders:
            kwargs = dict(p["budgets"][name], nvme=nvme_dir / name)
            _attempt(name, report, lambda: gpu.run_tierflow(name, initial, batches, device, DTYPES[dtype], lr, kwargs,
                                                            lag_ms=lag_ms, fault=fault))
            save()
    except KeyboardInterrupt:  # the contenders not run yet FAIL as "ran"; the table still prints
        report["interrupted"] = True
    except Exception as exc:  # noqa: BLE001 -- building failed: FAIL with the reason, table still prints
        traceback.print_exc()
        report["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        save()
        if own_nvme:
            shutil.rmtree(nvme_dir, ignore_errors=True)
    return report


def machine_description(device: str) -> str:
    gpu_name = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "no GPU used"
    return f"{gpu_name}; torch {torch.__version__}; {platform.node()}"


def _fmt(x, digits=4) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _gib(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**30:.3g}"


def _loss(run: dict, step: int):
    losses = run.get("losses", [])
    return losses[step] if step < len(losses) else None


def format_report(report: dict) -> str:
    """The summary table: losses per step, figures per contender, PASS/FAIL per criterion."""
    cfg, runs = report["config"], report["runs"]
    names = ["torch"] + cfg["contenders"]
    lines = [f"tierflow bench gpu ({cfg['preset']}): Llama {cfg['shape']}, {cfg['dtype']}, batch "
             f"{cfg['batch']}x{cfg['seq_len']}, {cfg['steps']} steps, lr {cfg['lr']}, lag {cfg['lag_ms']} ms, "
             f"fault {cfg['fault']}; {cfg['machine']}", "",
             "step  " + "  ".join(f"{n:>14}" for n in names)]
    for i in range(cfg["steps"]):
        cells = [_fmt(_loss(runs.get(n, {}), i), 7) for n in names]
        lines.append(f"{i:>4}  " + "  ".join(f"{c:>14}" for c in cells))
    lines += ["", f"{'contender':<16}{'median step s':>14}{'total s':>9}{'peak GPU GiB':>13}"
                  f"{'budget GiB':>11}{'max rel diff':>13}  homes / error"]
    for n in names:
        run = runs.get(n, {})
        detail = run.get("error") or run.get("info", {}).get("homes", "")
        budget_peak = run.get("info", {}).get("budget_peaks", {}).get("device", [None])[0]
        lines.append(f"{n:<16}{_fmt(run.get('median_step_s')):>14}{_fmt(run.get('total_s'), 3):>9}"
                     f"{_gib(run.get('peak_device_bytes')):>13}{_gib(budget_peak):>11}"
                     f"{_fmt(run.get('max_rel_loss_diff'), 3):>13}  {detail}")
    if report.get("interrupted"):
        lines.append("INTERRUPTED: the contenders without figures did not run")
    lines.append("")
    for c in report["criteria"]:
        lines.append(f"{'PASS' if c['passed'] else 'FAIL'}  {c['name']} (value {_fmt(c['value'], 3)}, "
                     f"limit {c['limit']})")
    lines.append(f"OVERALL: {'PASS' if report['passed'] else 'FAIL'}")
    return "\n".join(lines)


def run_gpu_bench(args) -> int:
    """`tierflow bench gpu`: run, print the table, write --json / --summary; 1 if a criterion failed."""
    preset = "cpu-smoke" if args.cpu_smoke else "1b"
    shape = PRESETS[preset]["shape"]
    overrides = {k: getattr(args, k) for k in ("hidden", "layers", "intermediate", "heads", "vocab")
                 if getattr(args, k) is not None}
    if args.device and torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("tierflow bench gpu: FAIL: --device cuda but CUDA is not available")
        return 1
    if preset == "1b" and not args.device and not torch.cuda.is_available():
        print("tierflow bench gpu: FAIL: no CUDA device (use --cpu-smoke to run the check on the CPU)")
        return 1
    report = run_gpu_check(preset, replace(shape, **overrides), args.batch_size, args.seq_len, args.steps,
                           args.device, args.dtype, args.lr, args.seed, args.lag_ms, tuple(args.contenders),
                           args.nvme, args.fault, args.json)
    text = format_report(report)
    print(text)
    if args.summary:
        Path(args.summary).write_text(text + "\n")
    return 0 if report["passed"] else 1
