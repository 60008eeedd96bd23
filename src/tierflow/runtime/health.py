"""Whether an engine may still train and save: closed, or failed by a job."""
from __future__ import annotations

import contextlib

from tierflow.errors import EngineFailedError, NonFiniteError, TierflowError


class Health:
    """The first failed transfer, update or gradient job; after it nothing trains or saves."""

    def __init__(self):
        self.failure: BaseException | None = None
        self.closed = False

    def fail(self, exc: BaseException) -> None:
        """A job failed: its step may be half applied (a skipped non-finite step is not a failure)."""
        if self.failure is None and not isinstance(exc, NonFiniteError):
            self.failure = exc

    @contextlib.contextmanager
    def marks_failure(self):
        """Any error raised inside fails the engine."""
        try:
            yield
        except BaseException as exc:
            self.fail(exc)
            raise

    def check(self) -> None:
        """Raise unless the engine may train and save."""
        if self.closed:
            raise TierflowError("this engine is closed")
        if self.failure is not None:
            raise EngineFailedError(
                f"an earlier transfer, update or gradient job failed ({type(self.failure).__name__}: "
                f"{self.failure}); the training state may be half-updated, so this engine no longer "
                f"trains or saves. Resume from the last checkpoint (tierflow.resume)") from self.failure
