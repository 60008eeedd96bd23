"""Train a causal LM with its state tiered across device, host and NVMe.

With no arguments, trains the built-in ~100M-parameter Llama (byte vocabulary,
random init) on the Python standard library's sources, with budgets small
enough (256 MiB device, 1 GiB host) that about a third of its ~1.6 GB of
training state spills to NVMe files in a temporary directory, removed at exit.

Prints where every class of tensor lives, a progress bar with loss, tokens/s
and I/O throughput, and a summary.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from tierflow.cli import checkpointing, model_io, progress
from tierflow.cli.progress import fmt_bytes

HELP = "train a causal LM beyond memory (default: built-in 100M Llama on stdlib text)"

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def _flag(default, metavar: str, text: str):
    """A :class:`TrainArgs` field that becomes ``--flag METAVAR`` with help ``text``."""
    return field(default=default, metadata={"metavar": metavar, "help": text})


@dataclass(frozen=True)
class TrainArgs:
    """Every knob of ``tierflow train``; the CLI flags are generated from these fields."""

    model: str = _flag("llama-100m", "NAME|PATH", "built-in name (llama-100m, llama-tiny, gpt2-tiny) "
                       "or a local Hugging Face model directory")
    data: str | None = _flag(None, "FILE", 'a .txt or .jsonl ("text" field) file; '
                             "default: the Python standard library's sources")
    device: str = _flag("auto", "DEVICE", "compute device: cpu, cuda, cuda:N, or auto (cuda if available)")
    device_memory: str = _flag("256MiB", "SIZE", "device memory budget, e.g. 8GiB ('none': no limit)")
    host_memory: str = _flag("1GiB", "SIZE", "host memory budget ('none': no limit)")
    nvme: str | None = _flag(None, "DIR", "NVMe spill directory; default: a temporary directory under "
                             "the user cache, removed at exit; 'none' turns the NVMe tier off")
    dtype: str | None = _flag(None, "DTYPE", "compute dtype on the device (float32, bfloat16, float16); "
                              "masters stay fp32. Default: the model's")
    unit_bytes: str | None = _flag(None, "SIZE", "target parameter bytes per unit, the piece of the model that "
                                   "moves between tiers as one; smaller units need less device memory. "
                                   "Default: chosen from the budgets")
    steps: int = _flag(30, "N", "optimizer steps")
    batch_size: int = _flag(1, "N", "sequences per micro-batch")
    seq_len: int = _flag(256, "N", "tokens per sequence")
    grad_accum: int = _flag(1, "N", "micro-batches per optimizer step")
    lr: float = _flag(1e-3, "LR", "peak learning rate (AdamW)")
    warmup: int = _flag(5, "N", "linear warm-up steps, then cosine decay to 10%%")
    weight_decay: float = _flag(0.01, "WD", "AdamW weight decay")
    clip: float = _flag(1.0, "NORM", "global gradient-norm clip (0: off)")
    seed: int = _flag(0, "N", "seed for the model init and the data order")
    log_every: int = _flag(10, "N", "print a log line every N steps (0: never)")
    save_every: int = _flag(0, "N", "save a checkpoint every N steps (and after the last) under --output "
                            "(0: only after the last, when --output is given)")
    output: str | None = _flag(None, "DIR", "checkpoint directory: DIR/step-N, and DIR/latest naming the newest")
    keep: int = _flag(2, "N", "keep only the newest N checkpoints under --output (0: keep all)")
    resume: str | None = _flag(None, "DIR", "continue exactly the run saved in DIR (an --output directory or one "
                               "checkpoint): weights, optimizer, lr schedule, RNG and data position; the "
                               "checkpoint's model, data, batch and schedule flags apply, --steps N extends "
                               "the run to N steps, and its budgets, --nvme and --dtype apply unless given")
    export: str | None = _flag(None, "DIR", "at the end, write the model in Hugging Face format (config.json + "
                               "safetensors) and its tokenizer to DIR (tierflow generate --model DIR uses it)")
    activations: str | None = _flag(None, "MODE", "saved activations: keep (on the device, accounted), "
                                    "recompute, offload (to host/NVMe), auto (per layer, from the budgets) or autograd "
                                    "(left to autograd, not accounted); default: auto on a GPU with "
                                    "--device-memory, else autograd")
    timeline: str | None = _flag(None, "FILE.png", "save a picture of the run: bytes per tier over time and "
                                 "compute, transfer, update and drain spans")
    #: The flags given on the command line (set by from_namespace); --resume takes the others from the checkpoint.
    given: frozenset = field(default=frozenset(), compare=False)

    def __post_init__(self) -> None:
        from tierflow.errors import ConfigError

        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.seq_len < 2:
            raise ConfigError("--seq-len must be at least 2")
        for name in ("lr", "clip", "weight_decay"):  # argparse takes "nan" and "inf" as floats
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} is not a finite number")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0 (got {self.weight_decay})")
        if not self.lr > 0 or min(self.warmup, self.clip, self.log_every, self.save_every, self.keep) < 0:
            raise ConfigError("--lr must be > 0; --warmup, --clip, --log-every, --save-every and --keep "
                              "must be >= 0")
        if self.save_every and not (self.output or self.resume):
            raise ConfigError("--save-every needs --output DIR (where the checkpoints go)")
        if self.activations is not None:
            from tierflow.config import check_mode
            check_mode(self.activations)  # a bad mode is reported before any data or model is loaded
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ConfigError(f"unknown --dtype {self.dtype!r}; choose one of {', '.join(_DTYPES)}")

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "TrainArgs":
        """The arguments parsed by :func:`add_arguments`; ``given`` names the flags on the command line."""
        values = {f.name: getattr(ns, f.name) for f in fields(cls) if getattr(ns, f.name, None) is not None}
        return cls(**values, given=frozenset(values))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per :class:`TrainArgs` field, with its default in the help."""
    for f in fields(TrainArgs):
        if "metavar" not in f.metadata:
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        default = f"default: {f.default}" if f.default is not None else None
        text = f.metadata["help"]
        if default is not None and "default" not in text.lower():
            text = f"{text} ({default})"
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None,
                            metavar=f.metadata["metavar"], help=text)


def run(ns: argparse.Namespace) -> int:
    """``tierflow train``: parse, train, print; 0 on success."""
    train(TrainArgs.from_namespace(ns))
    return 0


@dataclass(frozen=True)
class TrainResult:
    """What a run measured."""

    losses: list[float]
    step_seconds: list[float]
    tokens: int
    io_per_step: dict[str, float]
    peaks: dict
    first_step: int = 1  # later than 1 when the run was resumed from a checkpoint


def train(args: TrainArgs, console=None) -> TrainResult:
    """Train as ``args`` says, printing placement, progress and a summary."""
    from rich.console import Console

    import tierflow
    from tierflow.dist import ranks as distributed
    from tierflow.data import load_tokenizer, text_batches
    from tierflow.errors import TierflowError
    from tierflow.models import is_builtin, parameter_count

    device = _resolve_device(args.device)
    sharded = distributed.init_from_env(device)  # under torchrun: one rank of a data-parallel run
    rank, world = distributed.rank(), distributed.world_size()
    console = console or Console()
    if rank != 0:
        console = Console(quiet=True)  # rank 0 speaks for all
    if not hasattr(tierflow, "offload"):
        raise TierflowError("this tierflow installation has no engine (tierflow.offload is missing)")
    start, checkpoint, notes = 0, None, []
    if args.resume:
        args, checkpoint, start, notes = checkpointing.resume_plan(args)
    checkpointing.check_output(args)  # an unwritable --output is said before any work
    config = model_io.check_model(args.model) if checkpoint is None else None  # a bad model fails before any work
    model_io.check_export(args.export)
    limits = {"device": _budget(args.device_memory), "host": _budget(args.host_memory)}
    budgets = {tier: tierflow.parse_size(limit, what=f"--{tier}-memory")
               for tier, limit in limits.items() if limit is not None}
    tokenizer = load_tokenizer(None if is_builtin(args.model) else args.model)
    if config is not None:
        model_io.check_fits_data(config, None, tokenizer, args.seq_len)
    batches = text_batches(args.data, tokenizer, args.batch_size, args.seq_len, seed=args.seed)
    checkpointing.skip(batches, start * args.grad_accum * world)  # the data position of the checkpoint
    if world > 1:  # rank r trains on global micro-batches r, r + world, ...
        batches = itertools.islice(batches, rank, None, world)
    first_batch = next(batches)  # data errors surface before any model is built
    nvme_dir, temporary = _nvme_dir(args.nvme)
    if sharded and world > 1 and nvme_dir and not temporary:
        nvme_dir = os.path.join(nvme_dir, f"rank{rank}")  # each rank its own spill directory
        console.print(f"data parallel: {world} ranks, each with a shard of the state", highlight=False)
    engine, result = None, None
    try:
        engine, opt, sched = _start(args, checkpoint, device, limits, nvme_dir, tokenizer)
        if checkpoint is not None:
            console.print(f"resumed from {checkpoint} at step {start}", soft_wrap=True, highlight=False)
            for note in notes:
                console.print(note, soft_wrap=True, highlight=False)
        n_params = parameter_count(engine.module)
        console.print(f"[bold]model[/] {args.model}: {n_params / 1e6:.1f} M parameters, "
                      f"training state ~{fmt_bytes(16 * n_params)} (16 B/param)", soft_wrap=True)
        console.print(progress.placement_table(engine.placement(), budgets, nvme_dir))
        mode = f" ({engine.nvme.mode})" if engine.nvme is not None else " (unused: everything fits the budgets)"
        console.print(f"NVMe tier: {nvme_dir or 'off'}{mode if nvme_dir else ''}", soft_wrap=True, highlight=False)
        if start < args.steps:
            if args.timeline:  # record from the first step on
                from tierflow.bench.timeline import record_phases, save_timeline
                engine.events.enable()
                record_phases(engine)
            result = _loop(engine, opt, sched, _prepend(first_batch, batches), args, device, console, start)
            if engine.activations is not None:
                console.print(f"activations {engine.activations.describe()}", soft_wrap=True, highlight=False)
            if args.timeline:
                console.print(f"timeline: {save_timeline(engine, args.timeline)}", soft_wrap=True, highlight=False)
        else:
            console.print(f"the checkpoint is at step {start} of {args.steps}: nothing left to train")
        if args.export:
            console.print(f"exported to {model_io.export(engine, tokenizer, args.export)}", soft_wrap=True,
                          highlight=False)
    except KeyboardInterrupt:  # name the checkpoint to go on from
        raise KeyboardInterrupt(checkpointing.interrupted_message(args)) from None
    finally:
        if engine is not None:
            engine.close()
        if temporary:
            shutil.rmtree(nvme_dir, ignore_errors=True)
    if result is not None:
        console.print(progress.summary_table(result))
    return result


def _start(args: TrainArgs, checkpoint, device: str, limits: dict, nvme_dir, tokenizer):
    """(engine, optimizer, lr scheduler): a fresh model, or the run resumed from ``checkpoint``."""
    import torch

    import tierflow

    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
    budgets = dict(device=device, device_memory=limits["device"], host_memory=limits["host"], nvme=nvme_dir,
                   dtype=dtype, activations=args.activations, batch_shape=(args.batch_size, args.seq_len))
    schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
        opt, lambda s: _lr_factor(s, args.warmup, args.steps))
    if args.unit_bytes is not None:
        budgets["unit_bytes"] = args.unit_bytes
    if checkpoint is not None:
        engine, opt, sched = tierflow.resume(checkpoint, scheduler=schedule, **budgets)
        try:
            model_io.check_module_fits_data(engine.module, tokenizer, args.seq_len)
        except BaseException:
            engine.close()
            raise
        return engine, opt, sched
    torch.manual_seed(args.seed)
    engine = model_io.build(args.model, args.seed, budgets)
    try:
        model_io.check_module_fits_data(engine.module, tokenizer, args.seq_len)
    except BaseException:
        engine.close()
        raise
    opt = tierflow.AdamW(engine, lr=args.lr, weight_decay=args.weight_decay)
    return engine, opt, schedule(opt)


def _loop(engine, opt, sched, batches, args: TrainArgs, device: str, console, done: int = 0) -> TrainResult:
    """The training loop after the ``done`` steps already taken, with a progress bar, saving checkpoints as asked;
    returns the measurements."""
    losses, seconds, tokens = [], [], 0
    io_start = engine.io_stats()
    with progress.progress_bar(console) as bar:
        task = bar.add_task("train", total=args.steps, completed=done, loss="", info="")
        for step in range(done + 1, args.steps + 1):
            io_before, start = engine.io_stats(), time.perf_counter()
            loss, step_tokens, norm = _step(engine, opt, batches, args, device, step)
            sched.step()
            seconds.append(time.perf_counter() - start)
            losses.append(loss)
            tokens += step_tokens
            loss_text, info = progress.step_info(loss, norm, step_tokens, seconds[-1],
                                                 _delta(engine.io_stats(), io_before))
            bar.update(task, advance=1, loss=loss_text, info=info)
            if args.log_every and (step % args.log_every == 0 or step == 1):
                bar.console.print(f"step {step}/{args.steps}  lr {sched.get_last_lr()[0]:.1e}  {loss_text}  {info}",
                                  soft_wrap=True, highlight=False)
            if checkpointing.should_save(args, step):
                path = checkpointing.save_step(engine, sched, args, step)
                bar.console.print(f"saved {path}", soft_wrap=True, highlight=False)
    io_total = _delta(engine.io_stats(), io_start)
    per_step = {k: v / len(seconds) for k, v in io_total.items()}
    return TrainResult(losses, seconds, tokens, per_step, dict(engine.budget_peaks()), done + 1)


def _step(engine, opt, batches, args: TrainArgs, device: str, step: int) -> tuple[float, int, float]:
    """One optimizer step over ``grad_accum`` micro-batches: (mean loss, tokens, grad norm).
    A non-finite loss or gradient norm stops the run before the optimizer applies it."""
    loss_sum, tokens = 0.0, 0
    for _ in range(args.grad_accum):
        batch = {k: v.to(device) for k, v in next(batches).items()}
        out = engine(**batch)
        (out.loss / args.grad_accum).backward()
        loss_sum += float(_mean_over_ranks(engine, out.loss.detach()))
        tokens += int(batch["attention_mask"].sum())
    norm = opt.clip_grad_norm_(args.clip) if args.clip > 0 else float("nan")
    _check_finite(step, loss_sum / args.grad_accum, float(norm) if args.clip > 0 else 0.0, args)
    from tierflow.errors import NonFiniteError

    try:
        opt.step()
    except NonFiniteError as exc:  # the engine skipped the last step: its gradients were not finite
        _diverged(step - 1, f"its gradients were not finite ({exc})", args)
    opt.zero_grad()
    ranks = engine.dist.world if engine.dist is not None else 1  # tokens of the whole data-parallel step
    return loss_sum / args.grad_accum, tokens * ranks, float(norm)


def _check_finite(step: int, loss: float, norm: float, args: TrainArgs) -> None:
    """Raise NonFiniteError when the loss or the gradient norm is NaN or infinite. Called
    before ``opt.step()``: a finite loss with a NaN gradient would make every weight NaN, and
    the next checkpoint would save it. (The loss and norm are the same on every rank.)"""
    if math.isfinite(loss) and math.isfinite(norm):
        return
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {norm} (loss {loss:.4f})"
    _diverged(step, what, args)


def _diverged(step: int, what: str, args: TrainArgs) -> None:
    """Stop with what diverged, what was kept, and what to change."""
    from tierflow.errors import NonFiniteError

    last = checkpointing.last_checkpoint(args)
    kept = f"; the last checkpoint, {last}, is untouched" if last is not None else ""
    raise NonFiniteError(
        f"training diverged at step {step}: {what}. Stopped before the optimizer step, so nothing of "
        f"step {step} was applied or saved{kept}. Lower --lr (now {args.lr:g}) or warm up longer, check "
        f"the data, or with --dtype bfloat16/float16 suspect an overflow (try float32)")


def _mean_over_ranks(engine, loss):
    """The loss of the whole data-parallel batch (the mean of the ranks' mean losses)."""
    if engine.dist is None:
        return loss
    total = engine.dist.all_reduce_sum(loss.clone().float(), "all-reduce of the loss")
    return total / engine.dist.world




def _budget(size: str) -> str | None:
    """A budget flag's value; ``none`` / ``unlimited`` mean no limit (``None``)."""
    return None if size.strip().lower() in ("none", "unlimited") else size


def _resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _nvme_dir(nvme: str | None) -> tuple[str | None, bool]:
    """(directory for the NVMe tier or None, whether it is ours to delete at exit)."""
    if nvme is not None:
        return (None, False) if nvme.lower() == "none" else (nvme, False)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tierflow"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        return tempfile.mkdtemp(prefix="train-", dir=cache), True
    except OSError:  # read-only home: fall back to the system temp dir
        return tempfile.mkdtemp(prefix="tierflow-"), True


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _prepend(first, rest):
    """``first`` then everything in ``rest``."""
    yield first
    yield from rest


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """Per-key growth of the cumulative I/O counters."""
    return {k: after[k] - before.get(k, 0) for k in after}
