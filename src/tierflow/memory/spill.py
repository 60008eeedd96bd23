"""Where offloaded activations go when the host budget is short: one file in the NVMe directory.

Activations live for one step (written in forward, read back in backward, then
dropped), so the file is a bump allocator: extents are appended and the whole
file is reused from offset 0 once every activation of the step is gone. Plain
positional I/O (`os.pwrite` / `os.pread` release the GIL); the page cache may
absorb it, which is what one wants for data that is read back within a step.
"""
from __future__ import annotations

import ctypes
import errno
import os
import secrets
import threading
from pathlib import Path

import torch

from tierflow.errors import NvmeError, os_problem


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a dense CPU tensor's storage (any dtype, any dense strides)."""
    nbytes = t.untyped_storage().nbytes()
    return memoryview((ctypes.c_char * nbytes).from_address(t.untyped_storage().data_ptr())).cast("B")


def open_scratch_file(directory: str | Path, kind: str) -> tuple[int, Path]:
    """A new file in `directory` (created if missing), open for reading and writing, whose name
    is removed at once: the open descriptor keeps the data until it is closed, and the space
    goes back to the disk however the process ends (a crash, a kill, no close()). Returns the
    descriptor and the name it had (for messages)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"tierflow-{kind}-{os.getpid()}-{secrets.token_hex(4)}.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(path)
    return fd, path


class SpillFile:
    """Append-only scratch file for one step's activations."""

    def __init__(self, directory: str | Path):
        self._fd, self.path = open_scratch_file(directory, "activations")
        self._end = 0
        self._lock = threading.Lock()
        self.bytes_written = 0
        self.bytes_read = 0

    def write(self, host: torch.Tensor) -> tuple[int, int]:
        """Append the tensor's bytes; returns its extent (offset, nbytes)."""
        data = _bytes_of(host)
        with self._lock:
            offset, self._end = self._end, self._end + len(data)
        done = 0
        try:
            while done < len(data):
                done += os.pwrite(self._fd, data[done:], offset + done)
        except OSError as exc:
            raise self.io_error(exc, "writing", len(data), offset) from exc
        self.bytes_written += len(data)
        return offset, len(data)

    def read(self, extent: tuple[int, int], out: torch.Tensor) -> None:
        """Fill `out` (same shape, dtype and strides as what was written) from its extent."""
        offset, nbytes = extent
        view = _bytes_of(out)
        done = 0
        try:
            while done < nbytes:
                got = os.preadv(self._fd, [view[done:nbytes]], offset + done)
                if got <= 0:
                    raise OSError(errno.EIO, f"short read at offset {offset + done}")
                done += got
        except OSError as exc:
            raise self.io_error(exc, "reading", nbytes, offset) from exc
        self.bytes_read += nbytes

    def io_error(self, exc: OSError, verb: str, nbytes: int, offset: int) -> NvmeError:
        """An NvmeError that names the spill file and what to do (the bare OSError names neither)."""
        return NvmeError(
            exc.errno, f"I/O error {verb} {nbytes} bytes of offloaded activations at offset {offset} of the "
                       f"activation spill file {self.path}: {os_problem(exc, self.path.parent)}. Free space "
                       f"or fix the disk under {self.path.parent}, pass another nvme directory, or give "
                       f"host_memory room for the activations; then resume from the last checkpoint")

    def reset(self) -> None:
        """Every extent is dead: reuse the file from the start."""
        with self._lock:
            self._end = 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # (unlinked when opened: closing frees its space)
            self._fd = None
