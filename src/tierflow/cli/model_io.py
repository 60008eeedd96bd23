"""The model of ``tierflow train``: checked before any work, built into its tiers, exported
with its tokenizer.

A Hugging Face model directory is streamed into the tiers tensor by tensor
(``tierflow.load(..., trainable=True)``), never whole in memory, so the peak RSS of a run is
the budgets plus a fixed overhead, whatever the size of the model. Its config and the headers
of its safetensors files are checked first (:func:`check_model`): a missing or corrupt file
is one line naming it, before any data is read or anything written. ``--export`` writes the
tokenizer next to the weights, so ``tierflow generate --model EXPORT`` finds it again.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def check_model(model: str):
    """The config of ``model`` (a built-in name or a Hugging Face directory) once everything
    that loading it needs is known to be there: the config builds a model, every safetensors
    header is valid and holds each parameter with its shape. No weight is read."""
    from tierflow.checkpoint import check_pretrained
    from tierflow.models import builtin_config, is_builtin, model_dir

    if is_builtin(model):
        return builtin_config(model)
    return check_pretrained(model_dir(model))


def check_fits_data(config, rows: int | None, tokenizer, seq_len: int) -> None:
    """The model's embedding (``rows``, default the config's vocabulary) covers the tokenizer
    and its positions cover ``seq_len``; a ConfigError otherwise."""
    from tierflow.errors import ConfigError

    rows = rows if rows is not None else _vocab_size(config)
    if rows is not None and tokenizer.vocab_size > rows:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding only {rows}")
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and seq_len > limit:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's {limit} positions")


def check_module_fits_data(module, tokenizer, seq_len: int) -> None:
    """:func:`check_fits_data` for a built model (its embedding's real row count)."""
    check_fits_data(module.config, module.get_input_embeddings().weight.shape[0], tokenizer, seq_len)


def _vocab_size(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None)


def build(model: str, seed: int, budgets: dict):
    """A fresh training engine: a built-in model initialised from ``seed``, or the weights of
    a Hugging Face directory streamed into their tiers (never whole in memory)."""
    import tierflow
    from tierflow.models import build_model, is_builtin

    if is_builtin(model):
        module = build_model(model, seed=seed)
        module.train()
        return tierflow.offload(module, **budgets)
    engine = tierflow.load(model, trainable=True, **budgets)
    engine.module.train()  # load leaves it in eval mode, as from_pretrained does
    if getattr(engine.module, "config", None) is not None:
        engine.module.config.use_cache = False  # training: no KV cache
    return engine


def check_export(export: str | None) -> None:
    """``--export DIR`` can be written: DIR is absent or a directory (checked before training)."""
    from tierflow.errors import ConfigError

    if export and Path(export).exists() and not Path(export).is_dir():
        raise ConfigError(f"--export {export} exists and is not a directory: give a new or existing directory")


def export(engine, tokenizer, out: str) -> Path:
    """The model in Hugging Face format (config.json + safetensors) and its tokenizer's files
    in directory ``out``. The tokenizer is written to a temporary directory beside ``out`` and
    moved in once complete."""
    from tierflow.checkpoint import CheckpointError

    path = engine.save_pretrained(out)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tokenizer-", dir=path.parent))
    except OSError as exc:
        raise CheckpointError(f"cannot write the tokenizer next to {path}: {exc.strerror}") from None
    try:
        tokenizer.save_pretrained(staging)
        for item in staging.iterdir():
            os.replace(item, path / item.name)
    except OSError as exc:
        raise CheckpointError(f"could not write the tokenizer into {path}: {exc.strerror}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
