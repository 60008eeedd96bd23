"""The checkpoint manifest: what a checkpoint holds, described in one checksummed JSON file.

Written last into a checkpoint, it records the format version, the model (class, Hugging
Face config, dtype), every parameter's name, shape and trainability (and tied aliases),
the buffers, the optimizer's param groups and steps, the scheduler's state, the RNG
states, the engine's configuration and placement, the user's `extra`, and every data
file's size and sha256. Its own sha256 (over its canonical JSON) detects corruption.
"""
from __future__ import annotations

import base64
import hashlib
import json
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch

from tierflow.checkpoint.files import OLD_MARK, TMP_MARK, CheckpointError, TensorFileReader, file_sha256, write_bytes_durably

FORMAT, VERSION = "tierflow-checkpoint", 1
MANIFEST = "manifest.json"
FILES = {"master": "master.safetensors", "exp_avg": "exp_avg.safetensors",
         "exp_avg_sq": "exp_avg_sq.safetensors", "buffers": "buffers.safetensors"}
MOMENTS = ("exp_avg", "exp_avg_sq")
TUNING = ("unit_bytes", "prefetch_bytes", "chunk_bytes", "staging_buffers", "io_threads", "direct_io")


def describe(engine, scheduler, extra) -> dict:
    """Everything but the files: computed before writing, so bad input fails first."""
    from tierflow.version import __version__

    model = engine.module
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    persistent = set(model.state_dict(keep_vars=True))
    manifest = {
        "format": FORMAT, "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "software": {"tierflow": __version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "model": _model_info(engine),
        "params": [{"name": s.name, "shape": list(s.shape), "trainable": bool(s.trainable),
                    "aliases": [a for a in aliases.get(id(s.param), []) if a != s.name]}
                   for _, s in engine.named_slots()],
        "buffers": [{"name": n, "shape": list(b.shape), "dtype": dtype_name(b.dtype),
                     "persistent": n in persistent} for n, b in model.named_buffers()],
        "optimizer": _optimizer_info(engine),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(),
        "engine": {"config": _config_info(engine.cfg), "homes": list(engine.plan.homes),
                   "compute_dtype": dtype_name(engine.compute_dtype)},
        "extra": extra,
    }
    try:
        return json.loads(json.dumps(manifest, default=_encode))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot save: the scheduler state or `extra` is not JSON-serialisable "
                              f"({exc}); nothing was written") from None


def _model_info(engine) -> dict:
    model = engine.module
    cls = type(model)
    info = {"class": f"{cls.__module__}.{cls.__qualname__}", "dtype": dtype_name(engine.param_dtype),
            "training": bool(model.training), "config": None}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        info["config"] = json.loads(config.to_json_string(use_diff=False))
        info["config_class"] = f"{type(config).__module__}.{type(config).__qualname__}"
    return info


def _optimizer_info(engine) -> dict | None:
    opt = engine.optimizer  # the tierflow.AdamW attached to the engine
    names = {id(slot.param): slot.name for _, slot in engine.named_slots()}
    steps = engine.optimizer_steps
    if opt is None:
        return {"param_groups": None, "steps": steps}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in opt.param_groups]
    return {"class": f"{type(opt).__module__}.{type(opt).__qualname__}", "param_groups": groups, "steps": steps}


def _config_info(cfg) -> dict:
    return {"device": str(cfg.device), "device_memory": cfg.device_memory, "host_memory": cfg.host_memory,
            "nvme": str(cfg.nvme) if cfg.nvme is not None else None,
            "dtype": dtype_name(cfg.dtype) if cfg.dtype is not None else None,
            **{key: getattr(cfg, key) for key in TUNING}}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _encode(obj):
    """JSON for what state dicts hold besides plain values: tensors and numbers of numpy."""
    if isinstance(obj, torch.Tensor):
        return {"__tensor__": obj.detach().cpu().tolist(), "dtype": dtype_name(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def decode(obj):
    if isinstance(obj, dict):
        if "__tensor__" in obj and set(obj) == {"__tensor__", "dtype"}:
            return torch.tensor(obj["__tensor__"], dtype=getattr(torch, obj["dtype"]))
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    return obj


def rng_state() -> dict:
    b64 = lambda t: base64.b64encode(t.numpy().tobytes()).decode()  # noqa: E731
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": b64(torch.get_rng_state()), "python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    tensor = lambda text: torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(tensor(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if state.get("cuda") and torch.cuda.is_available():
        states = [tensor(s) for s in state["cuda"]][:torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(directory: Path, manifest: dict) -> None:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    body["checksum"] = _digest(body)
    write_bytes_durably(directory / MANIFEST, json.dumps(body, indent=1).encode())


def checkpoint_dir(path) -> Path:
    """The checkpoint `path` names: a checkpoint directory, or a directory whose `latest`
    file names one (as `tierflow train --output` writes)."""
    path = Path(path)
    if TMP_MARK in path.name:
        raise CheckpointError(f"{path} is an incomplete checkpoint (a save in progress or interrupted); "
                              f"load the complete checkpoint without '{TMP_MARK}...' in its name")
    if not path.exists():
        olds = sorted(path.parent.glob(f"{path.name}{OLD_MARK}*")) if path.parent.exists() else []
        hint = f"; an interrupted save left the previous checkpoint at {olds[0]}" if olds else ""
        raise CheckpointError(f"checkpoint {path} does not exist{hint}")
    if not (path / MANIFEST).exists() and (path / "latest").is_file():
        name = (path / "latest").read_text().strip()
        if not name or (path / name).resolve() == path.resolve():  # it would name this directory again
            raise CheckpointError(f"{path / 'latest'} names no checkpoint ({name!r}): it should hold the name of "
                                  f"a checkpoint directory in {path} (e.g. step-100); write the newest complete "
                                  f"one's name into it, or pass that checkpoint directory itself")
        return checkpoint_dir(path / name)
    return path


def read_manifest(path) -> dict:
    """The verified manifest of checkpoint `path` (its `extra`, scheduler state, ...)."""
    path = checkpoint_dir(path)
    file = path / MANIFEST
    if not file.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST}: not a tierflow checkpoint, or an incomplete one")
    try:
        manifest = json.loads(file.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is corrupt: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a tierflow checkpoint manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{file}: checkpoint format version {manifest.get('version')} is not "
                              f"supported (this tierflow reads version {VERSION})")
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    if manifest.get("checksum") != _digest(body):
        raise CheckpointError(f"{file} is corrupt: its checksum does not match its content")
    return manifest


def verify(path, checksums: bool = True) -> dict:
    """Check checkpoint `path` completely without loading it: manifest, every file's presence,
    size and (with `checksums`) sha256, and that each file's tensors match the manifest.
    Returns the manifest; raises CheckpointError naming the file and what is wrong."""
    path = checkpoint_dir(path)
    manifest = read_manifest(path)
    files = manifest["files"]
    for name, info in files.items():  # cheap checks first
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing from the checkpoint")
        size = file.stat().st_size
        if size != info["bytes"]:
            what = "truncated" if size < info["bytes"] else "too long"
            raise CheckpointError(f"{file} is {what}: {size} bytes, the manifest says {info['bytes']}")
    if checksums:
        for name, info in files.items():
            if file_sha256(path / name)[1] != info["sha256"]:
                raise CheckpointError(f"{path / name} is corrupt: its sha256 does not match the manifest")
    expected = expected_tensors(manifest)
    tensor_files = {FILES[key]: expected[key] for key in FILES}
    if "shards" in manifest:  # every rank's part instead of whole-array files (sharded.py)

        tensor_files = {FILES["buffers"]: expected["buffers"], **expected_parts(manifest)}
    for file_name, want in tensor_files.items():
        with TensorFileReader(path / file_name) as reader:
            got = {name: (list(reader.shape(name)), reader.dtype(name)) for name in reader.keys()}
            if got != want:
                raise CheckpointError(f"{path / file_name} does not match the manifest: {_difference(want, got)}")
    return manifest


def _difference(want: dict, got: dict) -> str:
    """The first way in which a file's tensors (name -> (shape, dtype)) differ from the manifest's."""
    for name in want:
        if name not in got:
            return f"tensor {name} is missing"
        if got[name] != want[name]:
            return f"tensor {name} is {got[name]}, the manifest says {want[name]}"
    return f"tensor {sorted(set(got) - set(want))[0]} is not in the manifest"


def expected_tensors(manifest: dict) -> dict:
    params = manifest["params"]
    fp32 = lambda p: (p["shape"], torch.float32)  # noqa: E731
    expected = {"master": {p["name"]: fp32(p) for p in params}}
    for name in MOMENTS:
        expected[name] = {p["name"]: fp32(p) for p in params if p["trainable"]}
    expected["buffers"] = {b["name"]: (b["shape"], getattr(torch, b["dtype"])) for b in manifest["buffers"]}
    return expected


ARRAYS = ("master",) + MOMENTS  # what each rank of a sharded checkpoint writes


def part_name(key: str, rank: int, world: int) -> str:
    return f"{key}.rank{rank:05d}-of-{world:05d}.safetensors"


def expected_parts(manifest: dict) -> dict:
    """Part file name -> {tensor name: ([count], float32)} as the manifest describes them."""
    shards = manifest["shards"]
    world = shards["world_size"]
    trainable = {p["name"]: p["trainable"] for p in manifest["params"]}
    expected = {}
    for rank, runs in enumerate(shards["runs"]):
        for key in ARRAYS:
            expected[part_name(key, rank, world)] = {
                name: ([count], torch.float32) for name, (_, count) in runs.items()
                if key == "master" or trainable[name]}
    return expected
