"""Save and resume the complete training state of an engine, crash-safely and streaming.

Saving streams every array window by window out of its tier (NVMe-resident state goes
through the engine's staging buffers straight into the file), hashing as it writes. It
writes into `NAME.tmp-<pid>-<random>`, fsyncs every file and the directory, then swaps
the directory into place (an atomic exchange where Linux allows), so a crash at any
moment leaves the previous complete checkpoint or the new complete one. Resuming
verifies the manifest, every file's size and checksum, and names and shapes against the
model before it builds anything; then it streams tensors one at a time into their tiers.
"""
from __future__ import annotations

import contextlib
import importlib
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tierflow.config import OffloadConfig, format_size, parse_size
from tierflow.core.plan import check_placement
from tierflow.errors import ConfigError
from tierflow.memory.device import return_freed_memory_to_os
from tierflow.runtime.holding import check_not_held
from tierflow.checkpoint.files import (CheckpointError, TensorFileReader, TensorFileWriter, fsync_dir,
                                       install_directory, os_reason, read_windows, remove_stale_temporaries,
                                       temporary_name)
from tierflow.checkpoint.manifest import (FILES, MANIFEST, MOMENTS, OLD_MARK, TMP_MARK, TUNING, checkpoint_dir, decode, describe,
                                          read_manifest,
                       set_rng_state, verify, write_manifest)

_SAVED = object()  # "as in the checkpoint"


def save(engine, path, scheduler=None, extra=None) -> Path:
    """Write a complete, verified checkpoint of `engine` to directory `path`, atomically.

    Saves the fp32 master weights, Adam moments and steps from every tier, the attached
    optimizer's param groups, `scheduler.state_dict()`, the torch/CUDA/Python/NumPy RNG
    states, the model's buffers and config, and `extra` (JSON-serialisable). Call it between
    optimizer steps (gradients being accumulated are not saved). If `path` holds a
    checkpoint it is replaced only once the new one is complete. On any error (disk full,
    I/O error) raises CheckpointError and leaves the previous checkpoint and the engine's
    state untouched. Returns the path.
    """
    path = Path(path).absolute()
    if TMP_MARK in path.name or OLD_MARK in path.name:
        raise CheckpointError(f"{path}: checkpoint names must not contain '{TMP_MARK}' or '{OLD_MARK}'")
    if engine.has_pending_gradients:
        warnings.warn("saving a checkpoint while gradients are being accumulated: they are not saved, so "
                      "a resume will not continue exactly; save after opt.step() and opt.zero_grad()",
                      stacklevel=2)
    engine.flush()
    manifest = describe(engine, scheduler, extra)
    if engine.dist is not None:  # every rank writes its shard; rank 0 the rest (sharded.py)
        from tierflow.checkpoint.sharded import save_sharded

        return save_sharded(engine, path, manifest, lambda: _prepare(path, _planned_bytes(
            [(s.name, (s.numel // engine.dist.world * 4,), torch.float32) for _, s in engine.named_slots()])))
    plan = _file_plan(engine)
    _prepare(path, sum(_planned_bytes(specs) for specs in plan.values()))
    tmp = path.parent / temporary_name(path.name)
    try:
        tmp.mkdir()
        manifest["files"] = _write_state(engine, tmp, plan)
        write_manifest(tmp, manifest)
        fsync_dir(tmp)
        install_directory(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {path}: {os_reason(exc)}; the previous "
                              f"checkpoint there (if any) is intact and training can go on") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _prepare(path: Path, need: int) -> None:
    """Create the parent directory, check that `path` may be replaced and `need` bytes fit."""
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create the directory {parent} for checkpoint {path.name}: "
                              f"{os_reason(exc, parent)}") from None
    _check_replaceable(path)
    _remove_stale(parent, path.name)
    _check_space(parent, need, path)


def _file_plan(engine) -> dict[str, list]:
    """File key -> [(tensor name, shape, dtype)] in the order they are written."""
    slots = [slot for _, slot in engine.named_slots()]
    plan = {"master": [(s.name, tuple(s.shape), torch.float32) for s in slots]}
    for name in MOMENTS:
        plan[name] = [(s.name, tuple(s.shape), torch.float32) for s in slots if s.trainable]
    plan["buffers"] = [(n, tuple(b.shape), b.dtype) for n, b in engine.module.named_buffers()]
    return plan


def _planned_bytes(specs) -> int:
    return sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for _, shape, dtype in specs) + 65536


def _write_state(engine, directory: Path, plan: dict) -> dict:
    """Stream every array out of its tier into the files; returns {file: {bytes, sha256}}."""
    writers = {}
    try:
        for key in ("master",) + MOMENTS:
            writers[key] = TensorFileWriter(directory / FILES[key], plan[key])
        for unit, slot in engine.named_slots():
            names = ("master",) + MOMENTS if slot.trainable else ("master",)
            with contextlib.closing(read_windows(engine, unit, slot, names)) as windows:
                for pieces in windows:  # closing: the staging buffers go back at once on errors
                    for name, piece in zip(names, pieces):
                        writers[name].write(slot.name, piece)
        writers["buffers"] = TensorFileWriter(directory / FILES["buffers"], plan["buffers"])
        for name, buf in engine.module.named_buffers():
            writers["buffers"].write(name, buf.detach().cpu())
        files = {}
        for key, writer in writers.items():
            size, digest = writer.close()
            files[FILES[key]] = {"bytes": size, "sha256": digest}
        return files
    finally:
        for writer in writers.values():
            writer.abort()


def _check_replaceable(path: Path) -> None:
    """`path` must be absent, an empty directory, or a tierflow checkpoint."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink() and ((path / MANIFEST).is_file() or not any(path.iterdir())):
        return
    raise CheckpointError(f"{path} exists and is not a tierflow checkpoint: refusing to replace it; "
                          f"choose another path or remove it")


def _remove_stale(parent: Path, name: str) -> None:
    """Remove what killed saves left behind: temporaries of dead processes, and copies of
    `name` set aside by an interrupted replacement once `name` itself is complete."""
    remove_stale_temporaries(parent)
    if (parent / name / MANIFEST).is_file():
        for entry in parent.glob(f"{name}{OLD_MARK}*"):
            shutil.rmtree(entry, ignore_errors=True)


def _check_space(parent: Path, need: int, path: Path) -> None:
    free = shutil.disk_usage(parent).free
    if free < need:
        raise CheckpointError(f"not enough disk space for checkpoint {path}: it needs about "
                              f"{format_size(need)}, {parent} has {format_size(free)} free; free "
                              f"space or save elsewhere (nothing was written)")


def resume(path, model: nn.Module | None = None, *, device=None, device_memory=_SAVED, host_memory=_SAVED,
           nvme=_SAVED, dtype=_SAVED, placement: str = "auto", scheduler=None, restore_rng: bool = True,
           verify_checksums: bool = True, make_engine, **options):
    """Rebuild the engine and optimizer of checkpoint `path` and continue exactly.

    Args:
        path: a checkpoint directory (or a directory with a `latest` pointer file).
        model: the model to load into (its parameters may be on the meta device); default:
            rebuilt from the saved Hugging Face config, never materialised in memory.
        device, device_memory, host_memory, nvme, dtype, placement, **options: as
            `tierflow.offload`; anything not given is taken from the checkpoint.
        scheduler: optional callable (optimizer) -> LR scheduler; it is built and its saved
            state loaded, and the result is returned as a third value.
        restore_rng: restore the torch, CUDA, Python and NumPy RNG states (default True).
        verify_checksums: check every file's sha256 before loading (default True).

    Returns (engine, optimizer) or (engine, optimizer, scheduler); the optimizer is None if
    none was attached when saving. Raises CheckpointError, before building anything, when
    the checkpoint is incomplete, corrupt or does not match `model`.
    """

    unknown = set(options) - set(TUNING) - {"activations", "batch_shape"}  # choices of this run, not saved
    if unknown:
        raise ConfigError(f"unknown options for resume: {sorted(unknown)} (known: {', '.join(TUNING)})")
    path = checkpoint_dir(path)
    # Bad options and a model another engine holds are said before any file is hashed.
    engine_kwargs = _engine_kwargs(read_manifest(path), device, device_memory, host_memory, nvme, dtype, options)
    OffloadConfig.create(**engine_kwargs)
    check_placement(placement)
    if model is not None:
        check_not_held(model)
    manifest = verify(path, checksums=verify_checksums)
    return_freed_memory_to_os()  # before anything is read: see tierflow.checkpoint.hf.load
    model = model if model is not None else _rebuild_model(manifest, path)
    names = _match_params(model, manifest, path / FILES["master"])
    _check_buffers(model, manifest, path / FILES["buffers"])
    readers = _open_readers(path, manifest)
    undo = _ModelChanges(model)  # the model is changed only once everything matched
    try:
        _set_trainable(model, manifest)
        _restore_buffers(model, manifest, readers["buffers"])
        master = readers["master"]
        try:
            engine = make_engine(model, source=lambda name: master.read(names[name]), placement=placement,
                                 **engine_kwargs)
        except BaseException:
            undo.restore()  # a failed engine gives the model back as it was
            raise
        try:
            saved_to_slot = {names[slot.name]: slot for _, slot in engine.named_slots()}
            _restore_moments(engine, manifest, saved_to_slot, readers)
            opt = _restore_optimizer(engine, manifest, saved_to_slot, path)
            sched = _restore_scheduler(opt, scheduler, manifest, path)
            model.train(manifest["model"]["training"])
        except BaseException:
            engine.close()
            raise
    finally:
        for reader in readers.values():
            reader.close()
    if restore_rng:
        set_rng_state(_rng_of_this_rank(manifest))
    return (engine, opt, sched) if scheduler is not None else (engine, opt)


def _open_readers(path: Path, manifest: dict) -> dict:
    """key -> reader of whole tensors: the files themselves, or every rank's parts."""
    if "shards" not in manifest:
        return {key: TensorFileReader(path / file) for key, file in FILES.items()}
    from tierflow.checkpoint.sharded import ARRAYS, ShardedReader

    readers = {"buffers": TensorFileReader(path / FILES["buffers"])}
    try:
        for key in ARRAYS:
            readers[key] = ShardedReader(path, manifest, key)
    except BaseException:
        for reader in readers.values():
            reader.close()
        raise
    return readers


def _rng_of_this_rank(manifest: dict) -> dict:
    """A sharded checkpoint resumed at its own world size gives each rank its own RNG states
    (dropout differs per rank); otherwise every rank takes rank 0's."""
    from tierflow.dist import ranks as distributed

    shards = manifest.get("shards")
    if shards and shards["world_size"] == distributed.world_size():
        return shards["rng"][distributed.rank()]
    return manifest["rng"]


def _rebuild_model(manifest: dict, path: Path) -> nn.Module:
    """The saved Hugging Face model class from its config, with parameters on the meta device."""
    info = manifest["model"]
    if not info.get("config"):
        raise CheckpointError(f"{path} holds a {info['class']} without a Hugging Face config: pass "
                              f"model=... (same architecture; parameters may be on the meta device)")
    model_cls = _transformers_class(info["class"], path)
    config_cls = _transformers_class(info["config_class"], path)
    config = config_cls.from_dict(info["config"])
    from tierflow.checkpoint.hf import meta_parameters

    with meta_parameters():
        model = model_cls._from_config(config) if hasattr(model_cls, "_from_config") else model_cls(config)
    return model.to(getattr(torch, info["dtype"]))


def _transformers_class(qualified: str, path: Path):
    module, _, name = qualified.rpartition(".")
    if module.split(".")[0] != "transformers":
        raise CheckpointError(f"{path} holds a {qualified}, which tierflow only rebuilds from transformers: "
                              f"pass model=...")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise CheckpointError(f"{path}: cannot import {qualified} ({exc}); install a transformers version "
                              f"that has it, or pass model=...") from None


def _match_params(model: nn.Module, manifest: dict, file: Path) -> dict[str, str]:
    """Model parameter name (any alias) -> its name in the checkpoint; checks that names and
    shapes match."""
    saved = {}
    for entry in manifest["params"]:
        for name in [entry["name"], *entry["aliases"]]:
            saved[name] = entry
    names = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        entry = saved.get(name)
        if entry is None:
            raise CheckpointError(f"{file} has no parameter {name} (the model does not match the checkpoint)")
        if list(param.shape) != entry["shape"]:
            raise CheckpointError(f"{file}: parameter {name} has shape {entry['shape']} in the checkpoint but "
                                  f"{list(param.shape)} in the model")
        names[name] = entry["name"]
    unused = sorted({e["name"] for e in manifest["params"]} - set(names.values()))
    if unused:
        raise CheckpointError(f"{file} has parameters the model lacks: {unused[:5]}")
    return names


def _check_buffers(model: nn.Module, manifest: dict, file: Path) -> None:
    own = dict(model.named_buffers())
    for entry in manifest["buffers"]:
        name = entry["name"]
        if name not in own:
            raise CheckpointError(f"{file} has buffer {name}, which the model lacks")
        if list(own[name].shape) != entry["shape"]:
            raise CheckpointError(f"{file}: buffer {name} has shape {entry['shape']} in the checkpoint but "
                                  f"{list(own[name].shape)} in the model")


class _ModelChanges:
    """What resume changes in the model before the engine exists (requires_grad, buffers),
    remembered so that a failure can put it back."""

    def __init__(self, model: nn.Module):
        self.trainable = [(param, param.requires_grad) for param in model.parameters()]
        self.buffers = [(module, dict(module._buffers)) for module in model.modules()]

    def restore(self) -> None:
        for param, requires_grad in self.trainable:
            param.requires_grad_(requires_grad)
        for module, buffers in self.buffers:
            module._buffers.clear()
            module._buffers.update(buffers)


def _set_trainable(model: nn.Module, manifest: dict) -> None:
    """requires_grad of every parameter as saved (frozen parameters stay frozen)."""
    trainable = {name: e["trainable"] for e in manifest["params"] for name in [e["name"], *e["aliases"]]}
    for name, param in model.named_parameters():
        param.requires_grad_(trainable[name])


def _restore_buffers(model: nn.Module, manifest: dict, reader: TensorFileReader) -> None:
    for entry in manifest["buffers"]:
        module_name, _, leaf = entry["name"].rpartition(".")
        model.get_submodule(module_name)._buffers[leaf] = reader.read(entry["name"])


def _engine_kwargs(manifest, device, device_memory, host_memory, nvme, dtype, options) -> dict:
    saved = manifest["engine"]["config"]
    pick = lambda value, key: saved[key] if value is _SAVED else value  # noqa: E731
    kwargs = {"device": device or saved["device"], "device_memory": pick(device_memory, "device_memory"),
              "host_memory": pick(host_memory, "host_memory"), "nvme": pick(nvme, "nvme"),
              "dtype": pick(dtype, "dtype"), "activations": options.get("activations"),
              "batch_shape": options.get("batch_shape")}
    same_host = host_memory is _SAVED or parse_size(host_memory) == saved["host_memory"]
    for key in TUNING:
        if key in options:
            kwargs[key] = options[key]
        elif key != "chunk_bytes" or same_host:  # the saved chunk size follows the saved host budget
            kwargs[key] = saved[key]
    return kwargs


def _restore_moments(engine, manifest: dict, saved_to_slot: dict, readers: dict) -> None:
    """Adam moments into their tiers, one parameter at a time, and the step counts."""
    units = {id(slot): unit for unit, slot in engine.named_slots()}
    for entry in manifest["params"]:
        slot = saved_to_slot[entry["name"]]
        if entry["trainable"] and slot.trainable:
            for key in MOMENTS:
                engine.write_array(units[id(slot)], slot, key, readers[key].read(entry["name"]))
    steps = manifest["optimizer"]["steps"]
    engine.optimizer_steps = {saved_to_slot[name].name: step for name, step in steps.items()}


def _restore_optimizer(engine, manifest: dict, saved_to_slot: dict, path: Path):
    """A tierflow.AdamW with the saved param groups (members and every setting)."""
    from tierflow.runtime.optimizer import AdamW

    groups = manifest["optimizer"]["param_groups"]
    if groups is None:
        return None
    rebuilt = []
    for group in groups:
        unknown = [n for n in group["params"] if n not in saved_to_slot]
        if unknown:
            raise CheckpointError(f"{path / MANIFEST}: an optimizer group names unknown parameters {unknown[:3]}")
        rebuilt.append({**_hyper(group), "params": [saved_to_slot[n].param for n in group["params"]]})
    return AdamW(engine, params=rebuilt)


def _hyper(group: dict) -> dict:
    """A saved param group's settings (JSON lists back to the tuples torch uses)."""
    return {k: tuple(v) if k == "betas" else v for k, v in group.items() if k != "params"}


def _restore_scheduler(opt, factory, manifest: dict, path: Path):
    if factory is None:
        return None
    if opt is None:
        raise CheckpointError(f"{path} has no optimizer state, so no scheduler can be resumed")
    sched = factory(opt)
    state = manifest.get("scheduler")
    if state is None:
        raise CheckpointError(f"{path} holds no scheduler state (save with scheduler=...)")
    sched.load_state_dict(decode(state))
    # Building the scheduler set the learning rates for step 0: put back those of the save.
    for group, saved in zip(opt.param_groups, manifest["optimizer"]["param_groups"]):
        group.update(_hyper(saved))
    return sched


