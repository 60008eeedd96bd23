"""Hugging Face format, streamed: export an engine as config + safetensors shards (+ index),
and build an engine from such a directory without ever holding the model in memory.

`save_pretrained` reads each parameter window by window out of its tier and writes it,
converted to the export dtype, into its shard. `load` builds the model with its
parameters on the meta device (`meta_parameters`), then lets `tierflow.offload` pull each
parameter from its shard with positional reads, one tensor at a time, straight into the
tier the plan gives it: a model bigger than RAM starts training without being whole in
memory.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import fnmatch
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from tierflow.config import parse_dtype, parse_size
from tierflow.errors import ConfigError
from tierflow.checkpoint.conversion import readings
from tierflow.checkpoint.files import (CheckpointError, TensorFileReader, TensorFileWriter, fsync_dir,
                                       install_directory, os_reason, read_windows, remove_stale_temporaries,
                                       temporary_name, write_bytes_durably)
from tierflow.memory.device import return_freed_memory_to_os

INDEX = "model.safetensors.index.json"


@contextlib.contextmanager
def meta_parameters():
    """Inside this context, modules register their parameters on the meta device (no memory,
    no initialisation cost); buffers stay real tensors. Not thread-safe (patches nn.Module)."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


# ==== export =================================================================================
def save_pretrained(engine, out_dir, max_shard_size="2GiB", dtype=None) -> Path:
    """Write the engine's current weights in Hugging Face format to `out_dir`: config.json
    (and generation_config.json), safetensors shards of at most `max_shard_size` and, for
    several shards, model.safetensors.index.json. `dtype`: export dtype (default: the
    model's own). Streams tensor by tensor; loadable with `from_pretrained`. A new
    directory appears complete or not at all. An existing export (a directory with weights)
    is replaced whole: the new directory, with the other files kept there (README, tokenizer,
    ...) linked in, is swapped in, so `out` holds the complete old export or the complete
    new one at every moment; a symlink `out` is followed. Into a directory without weights the
    files are moved (config last) and removed again if that fails."""
    if getattr(engine, "dist", None) is not None:
        raise ConfigError("save_pretrained of an engine sharded over ranks is not supported: save a "
                          "checkpoint (engine.save), then tierflow.resume it in one process and export")
    engine.flush()
    out = Path(out_dir).absolute()
    home = out.resolve() if out.is_symlink() else out  # the export is swapped in beside the real directory
    dtype = parse_dtype(dtype) or engine.param_dtype
    entries = _export_entries(engine)
    shards = _shards(entries, parse_size(max_shard_size, what="max_shard_size"), dtype)
    try:
        home.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(home.parent)
        tmp = home.parent / temporary_name(f".{home.name}")
        tmp.mkdir()
    except OSError as exc:
        raise CheckpointError(f"cannot create the export directory {out}: {os_reason(exc)}") from exc
    try:
        files = _write_shards(engine, tmp, shards, dtype)
        files += _write_configs(engine.module, tmp, dtype)
        fsync_dir(tmp)
        _publish(tmp, home, files)
    except OSError as exc:
        raise CheckpointError(f"could not export to {out}: {os_reason(exc)}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _export_entries(engine) -> list:
    """(key, shape, source) per state_dict entry, tied duplicates once; source is the
    (unit, slot) of a parameter or the buffer tensor."""
    from tierflow.core.tiling import tile_target

    slots = {id(slot.param): (unit, slot) for unit, slot in engine.named_slots()}
    entries, seen, tiles = [], set(), {}
    for key, value in engine.module.state_dict(keep_vars=True).items():
        if id(value) in seen:
            continue
        seen.add(id(value))
        target = tile_target(key, engine.tiled)
        if target is None:
            entries.append((key, tuple(value.shape), slots.get(id(value), value)))
        elif target[0] not in tiles:  # a tiled linear layer is exported whole, under its own key
            tiles[target[0]] = [None] * engine.tiled[target[0].rpartition(".")[0]]
            entries.append((target[0], None, tiles[target[0]]))
        if target is not None:
            tiles[target[0]][target[1]] = (slots[id(value)], tuple(value.shape))
    return [(key, shape, source) if shape is not None else _joined_tiles(key, source)
            for key, shape, source in entries]


def _joined_tiles(key: str, tiles: list) -> tuple:
    """The export entry of a tiled layer's parameter: its tiles' rows one after the other."""
    shapes = [shape for _, shape in tiles]
    return key, (sum(shape[0] for shape in shapes),) + shapes[0][1:], [part for part, _ in tiles]


def _export_dtype(source, dtype: torch.dtype) -> torch.dtype:
    if isinstance(source, torch.Tensor) and not source.dtype.is_floating_point:
        return source.dtype
    return dtype


def _shards(entries: list, limit: int, dtype: torch.dtype) -> list[list]:
    """Greedy split in state_dict order, each shard at most `limit` bytes (or one tensor)."""
    shards, size = [[]], 0
    for entry in entries:
        nbytes = _numel(entry[1]) * _export_dtype(entry[2], dtype).itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _write_shards(engine, directory: Path, shards: list, dtype: torch.dtype) -> list[str]:
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        specs = [(key, shape, _export_dtype(source, dtype)) for key, shape, source in shard]
        writer = TensorFileWriter(directory / name, specs, metadata={"format": "pt"})
        try:
            for key, _, source in shard:
                if isinstance(source, torch.Tensor):
                    writer.write(key, source.detach().cpu().to(_export_dtype(source, dtype)))
                    continue
                for unit, slot in (source if isinstance(source, list) else [source]):  # a list: tiles in row order
                    with contextlib.closing(read_windows(engine, unit, slot, ("master",))) as windows:
                        for (piece,) in windows:
                            writer.write(key, piece.to(dtype))
            total += writer.close()[0]
        finally:
            writer.abort()
        weight_map.update({key: name for key, _, _ in shard})
    if len(names) == 1:
        return names
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_bytes_durably(directory / INDEX, json.dumps(index, indent=2).encode())
    return names + [INDEX]


def _write_configs(module: nn.Module, directory: Path, dtype: torch.dtype) -> list[str]:
    """config.json (with the export dtype) and generation_config.json, when the model has them."""
    written = []
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config = copy.deepcopy(config)
        setattr(config, _config_dtype_key(), dtype)
        config.save_pretrained(str(directory))
        written.append("config.json")
    generation = getattr(module, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(str(directory))
        written.append("generation_config.json")
    return written


def _config_dtype_key() -> str:
    """The config attribute that records the weights' dtype: `dtype` from transformers 4.56."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _publish(tmp: Path, out: Path, files: list[str]) -> None:
    """Put the finished export `tmp` at `out` (see save_pretrained)."""
    if not out.exists():
        os.rename(tmp, out)
        fsync_dir(out.parent)
        return
    if not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    if not _holds_weights(out):
        _add_files(tmp, out, files)
        return
    # Replacing the files one by one would leave old and new shards mixed after a failure, a
    # model that loads without an error: the new directory gets the other files kept in `out`
    # and is swapped in whole, so `out` is the complete old export or the complete new one.
    _carry_over(out, tmp, files)
    shutil.copymode(out, tmp)
    fsync_dir(tmp)
    install_directory(tmp, out)


def _is_weights(name: str) -> bool:
    """A file of an export's weights: replaced by every export, never kept beside new ones."""
    return name == INDEX or fnmatch.fnmatchcase(name, "model*.safetensors")


def _holds_weights(directory: Path) -> bool:
    return any(_is_weights(entry.name) for entry in directory.iterdir())


def _add_files(tmp: Path, out: Path, files: list[str]) -> None:
    """Move the export's files into `out`, a directory without weights (so no old shard can
    mix with new ones): weights first, the index and configs last, so the model is complete
    before config.json declares it; on a failure the files that were not there are removed."""
    weights = [f for f in files if f.endswith(".safetensors")]
    added = []
    try:
        for name in weights + [f for f in files if f not in weights]:
            if not (out / name).exists():
                added.append(name)
            os.replace(tmp / name, out / name)
    except BaseException:
        for name in added:
            (out / name).unlink(missing_ok=True)
        raise
    fsync_dir(out)


def _carry_over(old: Path, new: Path, files: list[str]) -> None:
    """Into the new export `new`, every entry of the old directory `old` that the export does
    not replace: a README, tokenizer files, a Trainer's checkpoint-* folders..."""
    for entry in old.iterdir():
        if entry.name not in files and not _is_weights(entry.name):
            _link_tree(entry, new / entry.name)


def _link_tree(src: Path, dst: Path) -> None:
    """`src` again at `dst`: files hard-linked, not copied (large folders cost no space or
    time, and a file someone holds open stays that file), folders rebuilt, symlinks as such."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir()
        shutil.copymode(src, dst)
        for entry in src.iterdir():
            _link_tree(entry, dst / entry.name)
    else:
        try:
            os.link(src, dst)
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
            shutil.copy2(src, dst)


# Refusals of a hard link: a file system without them, another user's file (protected_hardlinks),
# too many links; a copy is made instead. Other errors (EIO, ENOSPC) stop the export.
_NO_LINK = {errno.EPERM, errno.EACCES, errno.EMLINK, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


# ==== import =================================================================================
def load(path, device="cpu", device_memory=None, host_memory=None, nvme=None, dtype=None,
         placement: str = "auto", model_class=None, trainable: bool = True, *, make_engine, **options):
    """An engine over the Hugging Face model in directory `path` (config.json + safetensors),
    built without materialising the model: each tensor is read from its shard and placed
    into its tier one at a time. Arguments as `tierflow.offload`; `model_class` defaults to
    `transformers.AutoModelForCausalLM`. The model starts in eval mode, as `from_pretrained`
    leaves it (call `engine.train()` to train). `trainable=False` freezes every parameter
    (inference): only compute-dtype weights are stored, no gradient or AdamW state.
    `make_engine`: `tierflow.offload` (passed in by the API, which this layer lies below)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory (a Hugging Face model directory is needed)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a Hugging Face model directory (no config.json)")
    parse_dtype(dtype)  # a bad dtype or size fails before anything is built or read
    for what, size in (("device_memory", device_memory), ("host_memory", host_memory)):
        parse_size(size, what=what)
    # Before the first tensor is read, not when the engine starts: the shards' headers and the
    # model's buffers are read first, and a large free among them raises glibc's dynamic mmap
    # threshold, after which every streamed tensor is freed into a heap that keeps it resident.
    return_freed_memory_to_os()
    model = _meta_model(path, model_class)
    model.eval()
    if not trainable:
        model.requires_grad_(False)
    readers = _open_shards(path)
    try:
        keys = _match_keys(model, readers, path)
        _load_buffers(model, readers)
        return make_engine(model, device=device, device_memory=device_memory, host_memory=host_memory, nvme=nvme,
                       dtype=dtype, placement=placement, source=lambda name: keys[name].read(),
                       **options)
    finally:
        for reader in readers:
            reader.close()


def check_pretrained(path, model_class=None):
    """What `load` checks before it places anything, without reading a weight: `path` is a
    Hugging Face model directory whose config builds a model (on the meta device) and whose
    safetensors headers are valid and hold every parameter with its shape. Returns the config;
    raises CheckpointError naming the file and what is wrong."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a Hugging Face model directory (no config.json)")
    model = _meta_model(path, model_class)
    readers = _open_shards(path)
    try:
        _match_keys(model, readers, path)
    finally:
        for reader in readers:
            reader.close()
    return model.config


def _meta_model(path: Path, model_class=None) -> nn.Module:
    """The model of directory `path` built from its config, parameters on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path / 'config.json'}: cannot read the model config ({exc})") from None
    with meta_parameters():
        try:
            return (model_class or AutoModelForCausalLM).from_config(config)
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{path / 'config.json'}: no causal LM can be built from it ({exc})") from None


def _open_shards(path: Path) -> list[TensorFileReader]:
    """Readers of the weight files the index names (or model.safetensors, or every *.safetensors)."""
    index = path / INDEX
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from None
    else:
        files = ["model.safetensors"] if (path / "model.safetensors").is_file() else sorted(
            p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no safetensors weights (other formats such as pytorch_model.bin "
                              f"are not read: convert them to safetensors)")
    readers = []
    try:
        for name in files:
            if not (path / name).is_file():
                raise CheckpointError(f"{path / name} is missing (named by {INDEX})")
            readers.append(TensorFileReader(path / name))
    except BaseException:
        for reader in readers:
            reader.close()
        raise
    return readers


def _match_keys(model: nn.Module, readers: list, path: Path) -> dict:
    """Model parameter name -> its Reading (conversion.py: the checkpoint tensors that make it,
    by transformers' conversion rules); every parameter must be found with its shape."""
    found = readings(model, readers)
    groups: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), (param, []))[1].append(name)
    keys = {}
    for param, names in groups.values():
        reading = next((found[n] for n in names if n in found), None)
        if reading is None:
            raise CheckpointError(f"{path}: no tensor for parameter {names[0]} in "
                                  f"{', '.join(r.path.name for r in readers)}")
        reader, key = reading.first
        what = f"tensor {key}" if reading.converter is None else f"the tensors converted into {reading.target} ({key}, ...)"
        bad = [d for d in reading.dtypes() if not d.is_floating_point]
        if bad:
            raise CheckpointError(f"{reader.path}: {what} has dtype {bad[0]}, not floating point")
        try:
            shape = reading.shape()
        except (RuntimeError, ValueError, IndexError) as exc:
            raise CheckpointError(f"{reader.path}: {what} cannot be converted into {names[0]} ({exc})") from None
        if shape != tuple(param.shape):
            raise CheckpointError(f"{reader.path}: {what} has shape {list(shape)}, the model "
                                  f"expects {list(param.shape)} (does config.json match the weights?)")
        keys.update({name: reading for name in names})
    return keys


def _load_buffers(model: nn.Module, readers: list) -> None:
    """Persistent buffers found in the shards replace the freshly built ones."""
    available = {key: reader for reader in readers for key in reader.keys()}
    for name, buf in list(model.named_buffers()):
        reader = available.get(name)
        if reader is None:
            continue
        if reader.shape(name) != tuple(buf.shape):
            raise CheckpointError(f"{reader.path}: buffer {name} has shape {list(reader.shape(name))}, the model "
                                  f"expects {list(buf.shape)}")
        module_name, _, leaf = name.rpartition(".")
        model.get_submodule(module_name)._buffers[leaf] = reader.read(name).to(buf.dtype)
