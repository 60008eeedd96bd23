"""Exceptions raised by tierflow.

Every error derives from :class:`TierflowError`, so callers can catch all of
tierflow's failures at once; the extra bases let existing ``except ValueError``
/ ``except OSError`` code keep working.
"""


class TierflowError(Exception):
    """Base class of all tierflow errors."""


class ConfigError(TierflowError, ValueError):
    """A configuration value is invalid or inconsistent."""


class BudgetError(TierflowError):
    """A memory budget cannot hold what the plan needs."""


class NvmeError(TierflowError, OSError):
    """The NVMe tier failed: directory unusable, disk full, or an I/O error."""


class CheckpointError(TierflowError):
    """A checkpoint or model file is missing, corrupt, truncated or does not match the model;
    or a checkpoint could not be written. The message names the file and what is wrong."""


class NonFiniteError(TierflowError, FloatingPointError):
    """Training diverged: the loss or the gradients of an optimizer step were not finite (NaN
    or inf). Nothing of that step was applied: weights and AdamW state are those of the step
    before (the engine skips it; `tierflow train` stops before saving)."""


class EngineFailedError(TierflowError):
    """A transfer, update or gradient job failed earlier: the engine's state may be half-updated,
    so it refuses to train or save. Resume from the last checkpoint."""


class UnsupportedError(TierflowError, RuntimeError):
    """A torch idiom that cannot work on a tiered model as it would on a plain one (e.g. a
    `torch.optim` optimizer over an engine's parameters): the message says what to use instead."""
