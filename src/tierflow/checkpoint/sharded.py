"""Checkpoints of an engine whose state is sharded over data-parallel ranks.

Every rank writes its own part of each array into the same temporary directory
(which must be on a file system all ranks see): `master.rank00001-of-00002.safetensors`
holds, for every parameter that overlaps rank 1's shard, the flat run of its
elements that rank 1 keeps. Rank 0 writes the buffers and, once every rank has
reported its files' sizes and checksums, the manifest (with the element range of
every run) and moves the directory into place. So a checkpoint is complete only
when every rank's part is: a crash of any rank before the rename leaves only a
temporary directory, which is never loaded.

Resuming reassembles each parameter from the runs of all parts (`ShardedReader`),
so a checkpoint resumes at any world size: 2 -> 1, 1 -> 2, ...
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch

from tierflow.checkpoint.files import (CheckpointError, TensorFileReader, TensorFileWriter, fsync_dir,
                                       install_directory, temporary_name)
from tierflow.checkpoint.manifest import ARRAYS, FILES, part_name, rng_state, write_manifest




def local_runs(engine) -> dict[str, list[int]]:
    """Parameter name -> [first element, count] of the run this rank holds."""
    runs = {}
    for unit, slot in engine.named_slots():
        state = engine.states[unit.uid]
        lo = max(slot.offset, state.base)
        hi = min(slot.offset + slot.numel, state.limit)
        if lo < hi:
            runs[slot.name] = [lo - slot.offset, hi - lo]
    return runs


def save_sharded(engine, path: Path, manifest: dict, prepare) -> Path:
    """Collective: every rank calls it. `prepare()` (rank 0 only) checks and clears the way
    and raises CheckpointError on a problem; `manifest` is rank 0's description."""
    dist = engine.dist
    tmp = None
    if dist.rank == 0:
        try:
            prepare()
            tmp = path.parent / temporary_name(path.name)
            tmp.mkdir()
        except BaseException as exc:
            tmp = exc
    tmp = dist.broadcast_object(tmp if not isinstance(tmp, BaseException) else repr(tmp),
                                "broadcast of the checkpoint directory")
    if not isinstance(tmp, Path):
        raise CheckpointError(f"could not save checkpoint {path}: rank 0 failed: {tmp}")
    error = None
    try:
        files = _write_part(engine, tmp, dist.rank, dist.world)
        if dist.rank == 0:
            files.update(_write_buffers(engine, tmp))
    except Exception as exc:  # every rank must reach the gather below, failed or not
        files, error = None, f"rank {dist.rank}: {exc}"
    reports = dist.gather_objects({"files": files, "error": error, "runs": local_runs(engine),
                                   "rng": rng_state()}, "gather of the checkpoint parts")
    failed = [r["error"] for r in reports if r["error"]]
    outcome = None
    if dist.rank == 0:
        outcome = _finish(tmp, path, manifest, reports, failed)
    outcome = dist.broadcast_object(outcome, "broadcast of the checkpoint outcome")
    if outcome:
        raise CheckpointError(outcome)
    return path


def _finish(tmp: Path, path: Path, manifest: dict, reports: list, failed: list) -> str | None:
    """Rank 0: write the manifest and install the directory; an error message, or None."""

    if failed:
        shutil.rmtree(tmp, ignore_errors=True)
        return f"could not write checkpoint {path}: {failed[0]}; the previous checkpoint is intact"
    try:
        manifest["files"] = {name: info for r in reports for name, info in r["files"].items()}
        manifest["shards"] = {"world_size": len(reports), "runs": [r["runs"] for r in reports],
                              "rng": [r["rng"] for r in reports]}
        write_manifest(tmp, manifest)
        fsync_dir(tmp)
        install_directory(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        return f"could not write checkpoint {path}: {exc}; the previous checkpoint is intact"
    return None


def _write_part(engine, directory: Path, rank: int, world: int) -> dict:
    """This rank's runs of master weights and moments, streamed out of its tiers."""
    runs = local_runs(engine)
    shapes = {slot.name: slot for _, slot in engine.named_slots()}
    specs = {key: [(name, (count,), torch.float32) for name, (_, count) in runs.items()
                   if key == "master" or shapes[name].trainable] for key in ARRAYS}
    writers = {}
    try:
        for key in ARRAYS:
            writers[key] = TensorFileWriter(directory / part_name(key, rank, world), specs[key])
        for unit, slot in engine.named_slots():
            if slot.name not in runs:
                continue
            names = ARRAYS if slot.trainable else ("master",)
            with contextlib.closing(engine.iter_windows(unit, slot, names)) as windows:
                for pieces in windows:
                    for name, piece in zip(names, pieces):
                        writers[name].write(slot.name, piece)
        files = {}
        for key, writer in writers.items():
            size, digest = writer.close()
            files[part_name(key, rank, world)] = {"bytes": size, "sha256": digest}
        return files
    finally:
        for writer in writers.values():
            writer.abort()


def _write_buffers(engine, directory: Path) -> dict:
    specs = [(n, tuple(b.shape), b.dtype) for n, b in engine.module.named_buffers()]
    writer = TensorFileWriter(directory / FILES["buffers"], specs)
    try:
        for name, buf in engine.module.named_buffers():
            writer.write(name, buf.detach().cpu())
        size, digest = writer.close()
    finally:
        writer.abort()
    return {FILES["buffers"]: {"bytes": size, "sha256": digest}}


class ShardedReader:
    """Reads whole parameters of one array ('master', 'exp_avg', 'exp_avg_sq') from the
    parts of every rank; same `read(name)` as TensorFileReader."""

    def __init__(self, path: Path, manifest: dict, key: str):
        shards = manifest["shards"]
        world = shards["world_size"]
        self.shapes = {p["name"]: p["shape"] for p in manifest["params"]}
        self.runs = shards["runs"]
        self.readers = [TensorFileReader(path / part_name(key, r, world)) for r in range(world)]

    def read(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        out = torch.empty(int(torch.Size(shape).numel()), dtype=torch.float32)
        filled = 0
        for runs, reader in zip(self.runs, self.readers):
            if name in runs and name in reader:
                start, count = runs[name]
                reader.read_into(name, out[start:start + count])
                filled += count
        if filled != out.numel():
            raise CheckpointError(f"the parts of the sharded checkpoint cover {filled} of the "
                                  f"{out.numel()} elements of {name}")
        return out.view(shape)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


#END
