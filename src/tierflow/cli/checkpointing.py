"""Checkpoints of ``tierflow train``: periodic saves under ``--output``, ``--resume``.

``--output DIR`` holds one checkpoint per save, ``DIR/step-N``, and a small file
``DIR/latest`` naming the newest complete one (replaced atomically after the
checkpoint is in place, so it never names a partial checkpoint). ``--keep N``
prunes all but the newest N. ``--resume`` takes such a directory (or one
checkpoint) and continues the run exactly: the checkpoint records the flags that
define the run (model, data, seed, batch shape, schedule, steps), the step
reached, and with it the data position; the engine restores weights, optimizer,
learning-rate schedule and RNG states. ``--steps`` given with ``--resume`` sets a
new total (the run goes on to it; the cosine schedule stretches to the new end);
the other run flags may be repeated but not changed. The budgets, ``--nvme`` and
``--dtype`` are the checkpoint's unless given on the command line.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

LATEST = "latest"
#: TrainArgs fields that define the run: a resumed run takes them from its checkpoint.
RUN_FIELDS = ("model", "data", "steps", "batch_size", "seq_len", "grad_accum", "lr", "warmup",
              "weight_decay", "clip", "seed")
#: TrainArgs fields of how the run was placed: a resumed run takes them from its checkpoint unless given.
SETTINGS = ("device_memory", "host_memory", "nvme", "dtype")


def save_step(engine, sched, args, step: int) -> Path:
    """Save ``DIR/step-<step>``, point ``DIR/latest`` at it, prune old ones; returns its path."""
    from tierflow.checkpoint import save
    from tierflow.checkpoint.files import replace_file_atomically

    output = Path(args.output)
    state = {"args": {k: getattr(args, k) for k in RUN_FIELDS if hasattr(args, k)}, "step": step,
             "settings": {k: getattr(args, k) for k in SETTINGS if hasattr(args, k)}, "batches_consumed": step * args.grad_accum}
    path = save(engine, output / f"step-{step}", scheduler=sched, extra={"train": state})  # every rank
    if engine.dist is None or engine.dist.rank == 0:  # shared files: one writer
        replace_file_atomically(output / LATEST, f"{path.name}\n".encode())
        prune(output, args.keep, keep_name=path.name)
    if engine.dist is not None:  # no rank reads `latest` before it names the new checkpoint
        engine.dist.barrier("barrier after saving a checkpoint")
    return path


def should_save(args, step: int) -> bool:
    """Whether step ``step`` ends with a checkpoint (every ``--save-every`` steps, and the last)."""
    if not args.output:
        return False
    return step == args.steps or (args.save_every > 0 and step % args.save_every == 0)


def prune(output: Path, keep: int, keep_name: str) -> None:
    """Remove all but the newest ``keep`` complete ``step-N`` checkpoints (0: keep all)."""
    if keep <= 0:
        return
    steps = sorted((int(p.name[5:]), p) for p in output.glob("step-*") if p.name[5:].isdigit() and p.is_dir())
    for _, path in steps[:-keep]:
        if path.name != keep_name:
            shutil.rmtree(path, ignore_errors=True)


def resume_plan(args):
    """(args of the resumed run, checkpoint path, step reached, notes to print) for ``--resume``:
    the run-defining flags of the checkpoint (``--steps`` when given sets a new total), its
    budgets, ``--nvme`` and ``--dtype`` unless given; ``--output`` defaults to the directory
    resumed from. Flags that would change the run are refused before anything is loaded."""
    from tierflow.checkpoint import checkpoint_dir, read_manifest
    from tierflow.errors import ConfigError

    given = Path(args.resume)
    path = checkpoint_dir(given)
    manifest = read_manifest(path)
    train = (manifest.get("extra") or {}).get("train")
    if not train:
        raise ConfigError(f"{path} was not saved by tierflow train (no training position in its manifest); "
                          f"resume it from Python with tierflow.resume")
    step, saved = int(train["step"]), train["args"]
    run = {k: v for k, v in saved.items() if k in RUN_FIELDS}
    _check_unchanged(args, run, path)
    notes = []
    if "steps" in args.given and args.steps != run["steps"]:
        if args.steps < step:
            raise ConfigError(f"--steps {args.steps} is below step {step}, where {path} stands: give --steps "
                              f"above {step} to train on, or leave it out to finish the saved run of "
                              f"{run['steps']} steps")
        notes.append(f"--steps {args.steps}: the run saved with {run['steps']} steps now ends at step {args.steps} "
                     f"(the learning-rate schedule decays to the new end)")
        run["steps"] = args.steps
    settings = train.get("settings") or _settings_of(manifest, saved)
    settings = {k: v for k, v in settings.items() if k in SETTINGS and k not in args.given}
    output = args.output or str(given if path != given else path.parent)
    return replace(args, **run, **settings, output=output), path, step, notes


def _check_unchanged(args, run: dict, path: Path) -> None:
    """Run-defining flags given with --resume must repeat the saved values (--steps may change)."""
    from tierflow.errors import ConfigError

    for key in RUN_FIELDS:
        if key == "steps" or key not in args.given or key not in run or _same(key, getattr(args, key), run[key]):
            continue
        flag = f"--{key.replace('_', '-')}"
        raise ConfigError(f"{flag} {getattr(args, key)} differs from the run saved in {path} ({flag} {run[key]}): "
                          f"a resumed run keeps its model, data, batch and schedule; leave {flag} out or start "
                          f"a new run without --resume")


def _same(key: str, value, saved) -> bool:
    if key in ("model", "data") and value is not None and saved is not None:
        return value == saved or Path(value).resolve() == Path(saved).resolve()
    return value == saved


def _settings_of(manifest: dict, saved_args: dict) -> dict:
    """The budgets of a checkpoint saved before the CLI recorded its settings: the engine's
    (sizes in bytes); its NVMe directory may have been a temporary one, so a new one is used."""
    config = manifest["engine"]["config"]
    size = lambda value: "none" if value is None else str(value)  # noqa: E731
    return {"device_memory": size(config["device_memory"]), "host_memory": size(config["host_memory"]),
            "dtype": saved_args.get("dtype")}


def skip(batches, count: int) -> None:
    """Advance the batch iterator past the ``count`` micro-batches already trained on."""
    for _ in range(count):
        next(batches)


def last_checkpoint(args) -> Path | None:
    """The newest complete checkpoint under ``--output`` (what ``DIR/latest`` names), or None."""
    if not args.output:
        return None
    latest = Path(args.output) / LATEST
    if not latest.is_file():
        return None
    path = latest.parent / latest.read_text().strip()
    return path if path.is_dir() else None


def interrupted_message(args) -> str:
    """What a Ctrl-C left behind and how to go on from it."""
    path = last_checkpoint(args)
    if path is not None:
        return (f"interrupted; the last checkpoint is {path}: continue the run with "
                f"`tierflow train --resume {args.output}`")
    if args.output:
        return (f"interrupted before the first checkpoint under {args.output}: nothing to resume; "
                f"save more often with --save-every N")
    return "interrupted; no checkpoint was saved (pass --output DIR and --save-every N to resume with --resume DIR)"


def check_output(args) -> None:
    """Refuse an ``--output`` the checkpoints cannot be written to, before any work (nothing is
    created here: the directory is made at the first save)."""
    import os

    from tierflow.errors import CheckpointError, is_read_only

    if not args.output:
        return
    path = Path(args.output).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise CheckpointError(f"--output {args.output}: {existing} is not a directory; pass another --output")
    if is_read_only(existing):
        raise CheckpointError(f"--output {args.output}: the file system at {existing} is read-only; "
                              f"pass an --output on a writable disk")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"--output {args.output}: permission denied on {existing} (fix its permissions "
                              f"or pass another --output)")
