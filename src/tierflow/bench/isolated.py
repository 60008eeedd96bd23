"""Running each contender of a side-by-side benchmark in its own Python process.

A process per contender gives each its own peak RSS and keeps DeepSpeed's and FSDP's process
groups (and their memory) apart; the contenders still start from the same weights, which the
weight checksum printed by each shows.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULT = "RESULT "  # the line a contender's process prints its figures on (JSON)
PROGRESS = "PROGRESS "  # lines a contender prints as it goes: '<what> <time.time()>' (read after a time-out)


def checksum(model: torch.nn.Module) -> float:
    """A fingerprint of the initial weights: the sum of |w| over all parameters."""
    return float(sum(p.detach().double().abs().sum() for p in model.parameters()))


def run_isolated(module: str, name: str, config: dict, timeout: float | None = None) -> dict:
    """Run `python -m module '{"name": name, "config": config}'` and return the JSON it prints
    after RESULT; a failure or a time-out is recorded as {"name", "error"}, not raised."""
    env = None
    src = str(Path(__file__).resolve().parents[2])
    if src not in sys.path[:1]:  # an uninstalled checkout (PYTHONPATH=src) still finds tierflow
        import os
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", module, json.dumps({"name": name, "config": config})]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"name": name, "error": f"did not finish within {timeout:.0f} s", "timed_out": timeout}
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-6:]
        return {"name": name, "error": f"exit status {done.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1][len(RESULT):])


def progress_lines(output) -> list[tuple[str, float]]:
    """(what, wall time) of the PROGRESS lines in a killed child's output (bytes or text)."""
    if isinstance(output, bytes):
        output = output.decode(errors="replace")
    found = []
    for line in (output or "").splitlines():
        if line.startswith(PROGRESS):
            what, _, when = line[len(PROGRESS):].rpartition(" ")
            found.append((what, float(when)))
    return found


def print_progress(what: str) -> None:
    """The contender's side of `progress_lines`."""
    print(f"{PROGRESS}{what} {time.time()!r}", flush=True)


def print_result(result: dict) -> None:
    """The contender process's side of `run_isolated`."""
    print(RESULT + json.dumps(result), flush=True)


def launch_in_cgroup(module: str, entry: str, spec: dict, cgroup_procs: str | None, timeout: float,
                     env: dict | None = None) -> dict:
    """Run `module.entry(json spec)` in a child that first joins the cgroup whose `cgroup.procs`
    file is `cgroup_procs` (None: none), before torch is imported, so that everything it
    allocates or reads is charged to the limit; its RESULT line's JSON, or {"error": ...} (an
    exit by SIGKILL is named: out of memory under the limit)."""
    import os

    code = ("import os, sys\n"
            "if sys.argv[1]:\n"
            "    open(sys.argv[1], 'w').write(str(os.getpid()))\n"
            f"from {module} import {entry}\n"
            f"{entry}(sys.argv[2])\n")
    child_env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), TOKENIZERS_PARALLELISM="false")
    child_env.update(env or {})
    try:
        done = subprocess.run([sys.executable, "-c", code, cgroup_procs or "", json.dumps(spec)],
                              capture_output=True, text=True, env=child_env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        killed_at = time.time()
        return {"error": f"did not finish within {timeout:.0f} s", "timed_out": timeout, "killed_at": killed_at,
                "progress": progress_lines(exc.stdout)}
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        killed = " (killed: out of memory under the cgroup limit)" if done.returncode in (-9, 137) else ""
        return {"error": f"exit status {done.returncode}{killed}: {' | '.join(tail)}"}
    return json.loads(lines[-1][len(RESULT):])
