"""tierflow: train models larger than memory by tiering state across device, host and NVMe.

    engine = tierflow.offload(model, device="cpu", device_memory="1GiB", host_memory="2GiB", nvme="/spill")
    opt = tierflow.AdamW(engine, lr=1e-4)

The package's front door: it re-exports the API (api.py) and the names users need; the
layers behind it are described in docs/architecture.md.
"""
from __future__ import annotations

from tierflow.api import Engine, load, offload, resume
from tierflow.checkpoint import CheckpointError, save, save_pretrained
from tierflow.config import OffloadConfig, format_size, parse_size
from tierflow.core.plan import Variant
from tierflow.errors import (BudgetError, ConfigError, EngineFailedError, NonFiniteError, NvmeError, TierflowError,
                             UnsupportedError)
from tierflow.runtime.optimizer import AdamW
from tierflow.version import __version__

__all__ = ["offload", "Engine", "AdamW", "OffloadConfig", "Variant", "parse_size", "format_size",
           "TierflowError", "ConfigError", "BudgetError", "NvmeError", "NonFiniteError", "EngineFailedError",
           "UnsupportedError",
           "resume", "load", "save", "save_pretrained", "CheckpointError", "__version__"]
