"""``tierflow bench quant``: compressed frozen weights (weights="int8" / "int4") against the same
model uncompressed, side by side.

Speed (``--speed``, the default): a Llama with random weights bigger than the memory limit is
saved as safetensors; each format runs generation in its own process inside a cgroup-v1 memory
controller whose limit counts the page cache (root only; else a warning), with the page cache
dropped first, so the weights must come from disk. Printed per format, against fp32: bytes
read from NVMe and moved to the device per decode step (engine.io_stats()), tokens/s, the
decode step's median, peak RSS, and whether the greedy tokens equal fp32's. Placements: "nvme"
(every unit's weights on disk: bytes per step fall by the compression ratio) and "auto" (the
planner's choice: a compressed model may fit the host budget and leave the disk alone).

Quality (``--quality``): the built-in ``llama-tiny`` is trained briefly (plain PyTorch, AdamW)
on standard-library text, half the files for training and the other half held out; then,
through ``tierflow.load(..., trainable=False, weights=...)`` and in plain PyTorch in memory
(the baseline), the held-out loss, the teacher-forced top-1 agreement with the fp32 model and
the agreement of greedy continuations.
"""
from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

from tierflow.bench.generate import build_model_dir, make_cgroup, model_config, reset_cgroup
from tierflow.bench.io import drop_caches
from tierflow.bench.isolated import launch_in_cgroup
from tierflow.bench.report import print_row, row, write_json

FORMATS = (None, "int8", "int4")
MiB = 2**20


# ---------------------------------------------------------------------------- speed
def _generate_child(spec: dict) -> dict:
    """In the contender's process (already inside the cgroup): load, generate, measure."""
    import torch

    import tierflow

    torch.set_num_threads(spec["threads"])
    ids = torch.randint(3, spec["vocab"], (spec["batch"], spec["prompt"]), generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    engine = tierflow.load(spec["model"], device=spec["device"], device_memory=spec["device_memory"],
                           host_memory=spec["host_memory"], nvme=spec["nvme"], trainable=False,
                           weights=spec["weights"], placement=spec["placement"])
    loaded = time.perf_counter() - start
    before = engine.io_stats()
    out = engine.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=spec["new_tokens"],
                          do_sample=False, pad_token_id=0)
    after = engine.io_stats()
    report = engine.last_generation
    result = dict(load_s=loaded, steps=[s.seconds for s in report.steps], nvme_read=[s.nvme_read for s in report.steps],
                  to_device=(after["host_to_device"] - before["host_to_device"]) / len(report.steps),
                  placement={tier: sum(v.values()) for tier, v in engine.placement().items()},
                  tokens=out[:, spec["prompt"]:].tolist(), peak_rss=_peak_rss())
    engine.close()
    return result


def _peak_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child_main(spec: str) -> None:
    print("RESULT " + json.dumps(_generate_child(json.loads(spec))), flush=True)


def _run_child(spec: dict, cgroup: Path | None, timeout: float) -> dict:
    drop_caches()
    reset_cgroup(cgroup)
    group = str(cgroup / "cgroup.procs") if cgroup is not None else None
    return launch_in_cgroup("tierflow.bench.quant", "child_main", spec, group, timeout)


def run_speed(directory, hidden=1024, layers=24, intermediate=2816, vocab=8000, device="cpu",
              device_memory="128MiB", host_memory="192MiB", limit="920MiB", batch=1, prompt=12, new_tokens=8,
              threads=2, placements=("nvme", "auto"), timeout=900.0) -> tuple[list, dict]:
    from tierflow.config import format_size, parse_size

    directory = Path(directory).absolute()
    model_dir, spill = directory / "model", directory / "spill"
    model_bytes = build_model_dir(model_dir, model_config(hidden, layers, intermediate, vocab))
    limit_b = parse_size(limit)
    print(f"model: {format_size(model_bytes)} fp32, memory limit {format_size(limit_b)} (page cache included), "
          f"budgets device {device_memory} host {host_memory} on {device}", flush=True)
    cgroup = make_cgroup(limit_b)
    rows, runs = [], {}
    try:
        for placement in placements:
            for fmt in FORMATS:
                shutil.rmtree(spill, ignore_errors=True)
                spec = dict(model=str(model_dir), vocab=vocab, batch=batch, prompt=prompt, new_tokens=new_tokens,
                            threads=threads, device=device, device_memory=parse_size(device_memory),
                            host_memory=parse_size(host_memory), nvme=str(spill), weights=fmt, placement=placement)
                print(f"placement {placement}, weights {fmt or 'fp32'} ...", flush=True)
                runs[f"{placement}/{fmt}"] = run = _run_child(spec, cgroup, timeout)
                if "error" in run:
                    print(f"  failed: {run['error']}", flush=True)
            rows += _speed_rows(placement, runs, batch, new_tokens)
    finally:
        if cgroup is not None:
            try:
                cgroup.rmdir()
            except OSError:
                pass
    return rows, {"model_bytes": model_bytes, "limit": limit_b, "cgroup": cgroup is not None, "runs": runs}


def _speed_rows(placement: str, runs: dict, batch: int, new_tokens: int) -> list[dict]:
    base = runs.get(f"{placement}/None", {})
    rows = []
    for fmt in FORMATS[1:]:
        run = runs.get(f"{placement}/{fmt}", {})
        if "steps" not in run or "steps" not in base:
            continue
        decode = lambda r: statistics.median(r["steps"][1:])  # noqa: E731
        read = lambda r: statistics.median(r["nvme_read"][1:])  # noqa: E731
        tps = lambda r: batch * new_tokens / sum(r["steps"])  # noqa: E731
        rows.append(row(f"{placement} {fmt}: fp32/compressed NVMe bytes per decode step", read(base),
                        max(read(run), 1), "ratio"))
        rows.append(row(f"{placement} {fmt}: fp32/compressed bytes to the device per step", base["to_device"],
                        max(run["to_device"], 1), "ratio"))
        rows.append(row(f"{placement} {fmt}: tokens/s (vs fp32)", tps(run), tps(base), "tokens/s"))
        rows.append(row(f"{placement} {fmt}: decode step s (vs fp32)", decode(run), decode(base), "s",
                        higher_is_better=False))
        same = sum(a == b for ra, rb in zip(run["tokens"], base["tokens"]) for a, b in zip(ra, rb))
        rows.append(row(f"{placement} {fmt}: greedy tokens equal to fp32's", same / (batch * new_tokens), 1.0,
                        "fraction (random weights)"))
    return rows


# ---------------------------------------------------------------------------- quality
def _split_stdlib(directory: Path, max_files: int = 400) -> tuple[Path, Path]:
    """Standard-library sources in two text files: even-numbered files to train on, odd ones
    held out (no file in both)."""
    from tierflow.data import stdlib_text_files

    files = stdlib_text_files()[:max_files]
    paths = directory / "train.txt", directory / "heldout.txt"
    for path, part in zip(paths, (files[0::2], files[1::2])):
        path.write_text("".join(f.read_text(errors="replace") + "\n" for f in part))
    return paths


def run_quality(directory, steps=300, batch=16, seq_len=128, eval_batches=16, lr=3e-3, new_tokens=32,
                threads=2, max_files=400) -> tuple[list, dict]:
    import torch

    import tierflow
    from tierflow.data import ByteTokenizer, text_batches
    from tierflow.models import build_model

    torch.set_num_threads(threads)
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    train_txt, heldout_txt = _split_stdlib(directory, max_files)
    tokenizer = ByteTokenizer()
    model = build_model("llama-tiny", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    start = time.perf_counter()
    batches = text_batches(train_txt, tokenizer, batch, seq_len, seed=0)
    for step in range(steps):
        loss = model(**next(batches)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    print(f"trained llama-tiny {steps} steps of {batch}x{seq_len} in {time.perf_counter() - start:.0f} s "
          f"(last training loss {loss.item():.3f})", flush=True)
    saved = directory / "llama-tiny-trained"
    model.eval().save_pretrained(saved)
    held = list(_take(text_batches(heldout_txt, tokenizer, 8, seq_len, seed=1), eval_batches))
    prompts = held[0]["input_ids"][:, :16]
    results = {"memory": _evaluate(model, held, prompts, new_tokens)}  # the baseline, plain PyTorch
    for fmt in FORMATS:
        engine = tierflow.load(saved, trainable=False, weights=fmt, nvme=directory / "spill", placement="nvme")
        results[str(fmt)] = _evaluate(engine, held, prompts, new_tokens)
        engine.close()
    base = results["None"]
    rows = [row("fp32 through tierflow: held-out loss (vs in memory)", base["loss"], results["memory"]["loss"], "nats",
                higher_is_better=False)]
    for fmt in FORMATS[1:]:
        got = results[fmt]
        rows.append(row(f"{fmt}: held-out loss (vs fp32)", got["loss"], base["loss"], "nats",
                        higher_is_better=False))
        rows.append(row(f"{fmt}: held-out loss change vs fp32", got["loss"] - base["loss"], None, "nats"))
        agree = (got["argmax"] == base["argmax"]).float().mean().item()
        rows.append(row(f"{fmt}: teacher-forced top-1 agreement with fp32", agree, 1.0, "fraction"))
        greedy = (got["greedy"] == base["greedy"]).float().mean().item()
        rows.append(row(f"{fmt}: greedy continuation tokens equal to fp32's", greedy, 1.0,
                        f"fraction of {new_tokens} x {prompts.shape[0]}"))
    return rows, {"steps": steps, "batch": batch, "seq_len": seq_len,
                  "losses": {k: v["loss"] for k, v in results.items()}}


def _take(iterator, count: int):
    for _ in range(count):
        yield next(iterator)


def _evaluate(model, held: list, prompts, new_tokens: int) -> dict:
    import torch

    losses, argmax = [], []
    with torch.no_grad():
        for b in held:
            out = model(**b)
            losses.append(out.loss.item())
            argmax.append(out.logits.argmax(-1)[b["attention_mask"].bool()])
        greedy = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=258)[:, prompts.shape[1]:]
    return {"loss": sum(losses) / len(losses), "argmax": torch.cat(argmax), "greedy": greedy}


def run_quant_bench(directory, speed=True, quality=True, json_path=None, **speed_options) -> list[dict]:
    rows, details = [], {}
    if quality:
        got, details["quality"] = run_quality(Path(directory) / "quality")
        rows += got
    if speed:
        got, details["speed"] = run_speed(directory, **speed_options)
        rows += got
    for r in rows:
        print_row(r)
    for name, run in details.get("speed", {}).get("runs", {}).items():
        if "steps" in run:
            print(f"{name}: load {run['load_s']:.1f} s, prefill {run['steps'][0]:.2f} s, decode step median "
                  f"{statistics.median(run['steps'][1:]):.3f} s, NVMe read per decode step "
                  f"{statistics.median(run['nvme_read'][1:]) / MiB:.1f} MiB, to the device "
                  f"{run['to_device'] / MiB:.1f} MiB, peak RSS {run['peak_rss'] / MiB:.0f} MiB, placement "
                  f"{json.dumps(run['placement'])}")
    write_json(rows + [{"name": "details", **details}], json_path)
    return rows
