"""The NVMe tier: one spill file, an extent allocator, and parallel positional I/O.

Design (measured on the target machines, see MACHINE-NOTES.md):

* O_DIRECT when the file system supports it: the data goes straight between
  our aligned buffers and the disk, without filling the page cache (which
  would compete with the training state for host memory).
* ``os.preadv`` / ``os.pwritev`` on a small thread pool: they release the GIL,
  so the main thread keeps computing while the disk works.  Large requests
  are split into ``chunk_bytes`` pieces spread across the threads, so a single
  big request keeps every thread (and the disk queue) busy.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from tierflow.errors import NvmeError, is_read_only, os_problem
from tierflow.memory.pool import aligned_empty

__all__ = ["Extent", "NvmeStore"]

_O_DIRECT = getattr(os, "O_DIRECT", 0)  # absent on macOS: always buffered there
_BUFFERED_MODE = "buffered (file system does not support O_DIRECT)"


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class Extent:
    """A region of the spill file; ``nbytes`` is already rounded up to the alignment."""

    offset: int
    nbytes: int


def _lower_thread_priority(increment: int) -> None:
    """Raise the calling I/O thread's nice value by ``increment`` (Linux: per thread).

    The I/O threads sleep on the disk nearly all the time, so they still get
    the CPU promptly when a request completes; but the wake-ups no longer
    preempt the compute threads as eagerly.  Measured on 2 cores with 2 torch
    threads: compute kept ~0.91 of its speed next to 2.4 GB/s of I/O with 10,
    ~0.85 with 0, with the same I/O throughput.
    """
    if increment <= 0 or not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + increment))
    except (OSError, AttributeError):  # not permitted or not supported: keep as is
        pass


def _byte_view(t: torch.Tensor) -> memoryview:
    """A writable memoryview over the bytes of a contiguous CPU tensor (any dtype)."""
    if t.device.type != "cpu":
        raise ValueError(f"NVMe I/O needs a CPU tensor, got one on {t.device}")
    if not t.is_contiguous():
        raise ValueError("NVMe I/O needs a contiguous tensor; call .contiguous() first")
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return memoryview(b"")
    # ctypes works for every dtype (numpy has no bfloat16); the caller keeps
    # the tensor alive until the I/O finishes.
    return memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")


class NvmeStore:
    """Spill storage for tensors in a single file under ``directory``.

    ``io_nice`` lowers the I/O threads' CPU priority so that their frequent
    short wake-ups disturb compute threads less (0 disables).

    Thread-safe: allocate/free and I/O may be called from any thread.  In
    direct mode (``store.direct``), every request's buffer address, ``start``
    and length must be multiples of ``alignment``; use buffers from
    :func:`aligned_empty` / :class:`BufferPool` and lengths rounded up to the
    alignment (extents are rounded up, so the rounded tail is in bounds).
    """

    def __init__(
        self,
        directory: str | Path,
        io_threads: int = 2,
        direct: bool | None = None,
        alignment: int = 4096,
        file_name: str = "tierflow-spill.bin",
        chunk_bytes: int = 8 << 20,
        io_nice: int = 10,
    ):
        if io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {io_threads}")
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a positive power of two, got {alignment}")
        if chunk_bytes <= 0 or chunk_bytes % alignment:
            raise ValueError(f"chunk_bytes must be a positive multiple of {alignment}")
        self._fd: int | None = None
        self.directory = Path(directory)
        self.path = self.directory / file_name
        self.alignment = alignment
        self.chunk_bytes = chunk_bytes
        self.io_threads = io_threads

        self._make_directory()
        self._fd, self.direct = self._open(direct)
        _unlink_now(self.path)
        self.mode = "O_DIRECT" if self.direct else _BUFFERED_MODE

        self._lock = threading.Lock()  # guards allocator state and counters
        self._file_bytes = 0  # current size of the spill file
        self._end = 0  # bump pointer: first byte never handed out
        self._free_list: list[Extent] = []  # freed extents, sorted by offset
        self._live: dict[int, int] = {}  # offset -> nbytes of allocated extents
        self._bytes_read = 0
        self._bytes_requested = 0
        self._bytes_written = 0
        self._executor = ThreadPoolExecutor(
            io_threads, thread_name_prefix="tierflow-nvme",
            initializer=_lower_thread_priority, initargs=(io_nice,),
        )

    # ------------------------------------------------------------------ setup

    def _make_directory(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise NvmeError(
                exc.errno,
                f"cannot create NVMe directory {self.directory} ({os_problem(exc, self.directory)}): "
                "pass a directory on a writable local disk",
            ) from exc
        if self.directory.is_dir() and is_read_only(self.directory):
            raise NvmeError(
                errno.EROFS,
                f"NVMe directory {self.directory}: the file system at {self.directory} is read-only: "
                "pass another directory, on a writable local disk",
            )
        if not self.directory.is_dir() or not os.access(self.directory, os.W_OK | os.X_OK):
            raise NvmeError(
                errno.EACCES,
                f"NVMe directory {self.directory} is not a writable directory: "
                "fix its permissions or pass another directory",
            )

    def _open_file(self, flags: int) -> int:
        try:
            # O_TRUNC: the spill file is scratch space; a leftover from a
            # crashed run holds nothing we need.
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | flags, 0o600)
        except OSError as exc:
            if flags and exc.errno == errno.EINVAL:
                raise  # O_DIRECT refused: the caller falls back
            raise NvmeError(
                exc.errno,
                f"cannot open spill file {self.path} ({os_problem(exc, self.directory)}): "
                "pass a directory on a writable local disk",
            ) from exc

    def _probe_direct(self, fd: int) -> None:
        """Write and read back one aligned block; raises OSError(EINVAL) if the
        file system accepted O_DIRECT at open time but rejects the I/O."""
        block = aligned_empty(self.alignment, self.alignment)
        block.fill_(0x5A)
        view = _byte_view(block)
        os.pwritev(fd, [view], 0)
        block.zero_()
        os.preadv(fd, [view], 0)
        os.ftruncate(fd, 0)
        if int(block[0]) != 0x5A:
            raise OSError(errno.EIO, "O_DIRECT probe read back wrong data")

    def _open(self, direct: bool | None) -> tuple[int, bool]:
        """Open the spill file, with O_DIRECT if wanted and supported."""
        if direct is False or not _O_DIRECT:
            if direct:
                raise NvmeError(errno.EINVAL, "O_DIRECT is not available on this platform")
            return self._open_file(0), False
        fd = None
        try:
            fd = self._open_file(_O_DIRECT)
            self._probe_direct(fd)
            return fd, True
        except OSError as exc:
            if fd is not None:
                os.close(fd)
            if isinstance(exc, NvmeError):
                raise
            if direct:
                raise NvmeError(
                    exc.errno,
                    f"the file system holding {self.directory} does not support O_DIRECT "
                    f"({exc.strerror}): pass direct=None/False or a directory on ext4/xfs",
                ) from exc
            return self._open_file(0), False

    # -------------------------------------------------------------- allocator

    @property
    def reserved_bytes(self) -> int:
        """Bytes currently handed out as extents (rounded sizes)."""
        with self._lock:
            return sum(self._live.values())

    @property
    def file_bytes(self) -> int:
        """Current size of the spill file (its high-water mark)."""
        return self._file_bytes

    def size_on_disk(self) -> int:
        """The spill file's size as the file system has it (the file has no name: see
        `_unlink_now`)."""
        if self._fd is None:
            raise NvmeError(errno.EBADF, f"NvmeStore for {self.path} is closed")
        return os.fstat(self._fd).st_size

    def allocate(self, nbytes: int) -> Extent:
        """Reserve ``nbytes`` (rounded up to the alignment) in the spill file."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        size = _round_up(nbytes, self.alignment)
        if size == 0:
            return Extent(0, 0)  # nothing to store; free() ignores it
        with self._lock:
            extent = self._take_free(size)
            if extent is None:
                extent = Extent(self._end, size)
                self._grow(self._end + size)
                self._end += size
            self._live[extent.offset] = size
            return extent

    def _take_free(self, size: int) -> Extent | None:
        """First fit from the free list; the unused tail stays free."""
        for i, ext in enumerate(self._free_list):
            if ext.nbytes >= size:
                if ext.nbytes == size:
                    del self._free_list[i]
                else:
                    self._free_list[i] = Extent(ext.offset + size, ext.nbytes - size)
                return Extent(ext.offset, size)
        return None

    def _grow(self, new_end: int) -> None:
        """Make the file at least ``new_end`` bytes long, reserving the blocks
        now so that a full disk shows up here rather than mid-step."""
        if new_end <= self._file_bytes:
            return
        old = self._file_bytes
        try:
            os.posix_fallocate(self._fd, old, new_end - old)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise self._disk_full(new_end - old) from exc
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise NvmeError(exc.errno, f"cannot grow {self.path}: {exc.strerror}") from exc
            os.ftruncate(self._fd, new_end)  # no fallocate: a sparse file will do
        self._file_bytes = new_end

    def free(self, extent: Extent) -> None:
        """Give an extent back; its space is reused by later allocations."""
        if extent.nbytes == 0:
            return
        with self._lock:
            if self._live.get(extent.offset) != extent.nbytes:
                raise ValueError(f"{extent} is not allocated in this store (double free?)")
            del self._live[extent.offset]
            self._insert_free(extent)

    def _insert_free(self, extent: Extent) -> None:
        """Insert into the sorted free list, merging with neighbours."""
        free = self._free_list
        i = 0
        while i < len(free) and free[i].offset < extent.offset:
            i += 1
        free.insert(i, extent)
        if i + 1 < len(free) and free[i].offset + free[i].nbytes == free[i + 1].offset:
            free[i] = Extent(free[i].offset, free[i].nbytes + free[i + 1].nbytes)
            del free[i + 1]
        if i > 0 and free[i - 1].offset + free[i - 1].nbytes == free[i].offset:
            free[i - 1] = Extent(free[i - 1].offset, free[i - 1].nbytes + free[i].nbytes)
            del free[i]
        # A free run at the top lowers the bump pointer (the file keeps its size).
        if free and free[-1].offset + free[-1].nbytes == self._end:
            self._end = free.pop().offset

    def check_space(self, nbytes: int) -> int:
        """Raise NvmeError unless the disk can hold a spill file of ``nbytes``.

        Space the file already holds counts as available.  Returns the free
        bytes reported by the file system.
        """
        st = os.statvfs(self.directory)
        free = st.f_bavail * st.f_frsize
        if nbytes - self._file_bytes > free:
            raise NvmeError(
                errno.ENOSPC,
                f"NVMe directory {self.directory} has {_gib(free)} free but the plan spills "
                f"{_gib(nbytes)}: free space or pass a directory on a larger disk",
            )
        return free

    def _disk_full(self, nbytes: int, offset: int | None = None) -> NvmeError:
        where = "" if offset is None else f" at offset {offset}"
        return NvmeError(
            errno.ENOSPC,
            f"disk full writing {nbytes} bytes{where} of {self.path}: "
            "free space or pass a directory on a larger disk",
        )

    # -------------------------------------------------------------------- I/O

    @property
    def bytes_read(self) -> int:
        return self._bytes_read

    @property
    def bytes_requested(self) -> int:
        """Bytes of the reads submitted so far (`bytes_read` counts them as they complete)."""
        return self._bytes_requested

    @property
    def bytes_written(self) -> int:
        return self._bytes_written

    def read_async(self, extent: Extent, dst: torch.Tensor, start: int = 0) -> Future:
        """Fill ``dst`` with its size in bytes from byte ``start`` of ``extent``."""
        return self._submit(extent, dst, start, write=False)

    def write_async(self, extent: Extent, src: torch.Tensor, start: int = 0) -> Future:
        """Store the bytes of ``src`` at byte ``start`` of ``extent``."""
        return self._submit(extent, src, start, write=True)

    def read(self, extent: Extent, dst: torch.Tensor, start: int = 0) -> None:
        self.read_async(extent, dst, start).result()

    def write(self, extent: Extent, src: torch.Tensor, start: int = 0) -> None:
        self.write_async(extent, src, start).result()

    def _check_request(self, extent: Extent, tensor: torch.Tensor, start: int) -> memoryview:
        if self._fd is None:
            raise NvmeError(errno.EBADF, f"NvmeStore for {self.path} is closed")
        view = _byte_view(tensor)
        n = len(view)
        if start < 0 or start + n > extent.nbytes:
            raise ValueError(
                f"request of {n} bytes at start {start} does not fit in {extent}"
            )
        if self.direct and (n % self.alignment or start % self.alignment
                            or (n and tensor.data_ptr() % self.alignment)):
            raise ValueError(
                f"O_DIRECT I/O needs buffer address, start and length to be multiples of "
                f"{self.alignment} (got address {tensor.data_ptr():#x}, start {start}, "
                f"length {n}): use tierflow.memory.pool.aligned_empty/BufferPool buffers and "
                "round the length up to the alignment"
            )
        return view

    def _submit(self, extent: Extent, tensor: torch.Tensor, start: int, write: bool) -> Future:
        view = self._check_request(extent, tensor, start)
        offset = extent.offset + start
        done: Future = Future()
        pieces = [(i, min(self.chunk_bytes, len(view) - i))
                  for i in range(0, len(view), self.chunk_bytes)]
        if not pieces:
            done.set_result(0)
            return done
        if not write:
            with self._lock:
                self._bytes_requested += len(view)
        state = {"left": len(pieces), "error": None}
        state_lock = threading.Lock()

        def piece_done(fut: Future) -> None:
            with state_lock:
                state["left"] -= 1
                exc = fut.exception()
                if exc is not None and state["error"] is None:
                    state["error"] = exc
                last = state["left"] == 0
            if last:
                if state["error"] is not None:
                    done.set_exception(state["error"])
                else:
                    done.set_result(len(view))

        done.set_running_or_notify_cancel()
        for i, n in pieces:
            # The closure keeps `tensor` alive until its last piece is done.
            fut = self._executor.submit(self._transfer_all, self._fd, view[i : i + n], offset + i, tensor, write)
            fut.add_done_callback(piece_done)
        return done

    def _transfer_all(self, fd: int, view: memoryview, offset: int, _keepalive: torch.Tensor,
                      write: bool) -> None:
        """Read or write exactly len(view) bytes at ``offset``, looping over short transfers."""
        call, verb = (os.pwritev, "writing") if write else (os.preadv, "reading")
        done = 0
        while done < len(view):
            try:
                n = call(fd, [view[done:]], offset + done)
            except OSError as exc:
                raise self._io_error(exc, verb, len(view) - done, offset + done) from exc
            if n == 0:
                what = f"no progress writing {self.path}" if write else f"unexpected end of {self.path}"
                raise NvmeError(errno.EIO, f"{what} at offset {offset + done}")
            done += n
        with self._lock:
            if write:
                self._bytes_written += done
            else:
                self._bytes_read += done

    def _io_error(self, exc: OSError, verb: str, nbytes: int, offset: int) -> NvmeError:
        if exc.errno == errno.ENOSPC:
            return self._disk_full(nbytes, offset)
        return NvmeError(
            exc.errno,
            f"I/O error {verb} {nbytes} bytes at offset {offset} of {self.path}: {exc.strerror}",
        )

    def sync(self) -> None:
        """Flush the spill file's written data to the disk (buffered I/O; O_DIRECT needs none)."""
        if self._fd is not None:
            os.fsync(self._fd)

    # --------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Wait for pending I/O, then close the spill file (which frees its space). Idempotent."""
        fd, self._fd = getattr(self, "_fd", None), None  # refuses new requests
        if fd is None:
            return
        executor = getattr(self, "_executor", None)
        if executor is not None:
            try:
                executor.shutdown(wait=True)  # queued pieces hold `fd`: let them finish
            except RuntimeError:  # closed from one of its own threads (e.g. via __del__)
                executor.shutdown(wait=False)
        os.close(fd)  # the file has had no name since it was opened (`_unlink_now`)

    def __enter__(self) -> "NvmeStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may be half torn down
            pass

    def __repr__(self) -> str:
        return (
            f"NvmeStore({str(self.path)!r}, mode={self.mode!r}, "
            f"io_threads={self.io_threads}, reserved={self.reserved_bytes})"
        )


def _unlink_now(path: Path) -> None:
    """Remove a scratch file's name while its descriptor stays open: the data lives until the
    descriptor closes, and the space goes back to the disk however the process ends (a
    crash, a kill, a script that never calls close()), never left behind in the directory."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
