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


def os_problem(exc: OSError, path=None) -> str:
    """Why an operating-system call on ``path`` failed, in words that say what to change: a
    read-only file system (EROFS, or a refusal on a file system mounted read-only) is not a
    permission problem, and a full disk is neither."""
    import errno
    import os

    path = path if path is not None else exc.filename
    at = f" at {path}" if path is not None else ""
    if exc.errno == errno.EROFS or (exc.errno in (errno.EACCES, errno.EPERM) and is_read_only(path)):
        return f"the file system{at} is read-only"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{f' on {path}' if path is not None else ''} (fix its permissions)"
    where = f" ({path})" if path is not None else ""
    if exc.errno == errno.ENOSPC:
        return f"the disk is full{where}"
    return f"{exc.strerror or os.strerror(exc.errno or 0) or exc}{where}"


def is_read_only(path) -> bool:
    """Whether ``path`` (or its nearest existing parent) is on a file system mounted read-only."""
    import os
    from pathlib import Path

    if path is None:
        return False
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        try:
            return bool(os.statvfs(candidate).f_flag & os.ST_RDONLY)
        except OSError:
            continue
    return False
