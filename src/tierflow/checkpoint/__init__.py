"""Crash-safe checkpoints of tiered training state, and streaming Hugging Face import/export.

    engine.save("ckpt/step-1000", scheduler=sched, extra={"data_position": n})
    engine, opt = tierflow.resume("ckpt/step-1000", device="cpu", host_memory="2GiB", nvme="/spill")
    engine, opt, sched = tierflow.resume("ckpt/step-1000", scheduler=lambda opt: LambdaLR(opt, f))
    engine.save_pretrained("out/")          # config.json + safetensors shards (+ index)
    engine = tierflow.load("out/", host_memory="2GiB", nvme="/spill")

A checkpoint is a directory (format and guarantees: docs/checkpoints.md):

    manifest.json            format version, model config, parameter names/shapes, optimizer
                             groups and steps, scheduler state, RNG states, engine config and
                             placement, the user's `extra`, each file's size and sha256
    master.safetensors       fp32 master weights, one tensor per parameter
    exp_avg.safetensors      Adam first moments (trainable parameters)
    exp_avg_sq.safetensors   Adam second moments (trainable parameters)
    buffers.safetensors      every buffer of the model (persistent or not)

Modules: `files` (streaming safetensors, fsync/rename helpers), `manifest` (what a
checkpoint holds, verification), `state` (save / resume), `hf` (Hugging Face format).
"""
from tierflow.checkpoint.files import CheckpointError
from tierflow.checkpoint.hf import check_pretrained, load, meta_parameters, save_pretrained
from tierflow.checkpoint.manifest import checkpoint_dir, read_manifest, verify
from tierflow.checkpoint.files import read_windows
from tierflow.checkpoint.state import resume, save

__all__ = ["save", "resume", "read_manifest", "verify", "checkpoint_dir", "save_pretrained", "load", "check_pretrained",
           "meta_parameters", "read_windows", "CheckpointError"]
