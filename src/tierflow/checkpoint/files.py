"""Streaming safetensors files and crash-safe file-system steps, for checkpoints.

A safetensors file is an 8-byte little-endian header length, a JSON header that
gives every tensor's dtype, shape and byte range, then the tensors' bytes back to
back. When every shape is known in advance (it always is for a model) the header
can be written first and the tensors after it, piece by piece, in the header's
order: `TensorFileWriter` does that, hashing the bytes as they go, so a file of
any size is written with one staging buffer of memory. `TensorFileReader` reads
one tensor (or one range of it) with positional reads: no mmap, so reading a
file never maps it into the process's resident memory.

The helpers at the end make directory updates crash-safe: fsync of files and
directories, atomic replacement of a small file, and the atomic exchange of two
directories (Linux `renameat2(RENAME_EXCHANGE)`, with a fallback).
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from tierflow.errors import CheckpointError, TierflowError, os_problem  # noqa: F401  (CheckpointError re-exported)

DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        DTYPE_CODES[getattr(torch, _name)] = _code
        CODE_DTYPES[_code] = getattr(torch, _name)

OLD_MARK = ".old-"  # an older checkpoint being replaced: NAME.old-<pid>-<8 hex digits>
TMP_MARK = ".tmp-"  # temporaries are named NAME.tmp-<pid>-<8 hex digits>
_TEMPORARY = re.compile(r"^.+\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")
HASH_CHUNK = 8 * 2**20
MAX_HEADER = 100 * 2**20  # safetensors' own limit


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor of any dtype, without a copy."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


_OVERLAP_BYTES = 1 << 20  # pieces at least this big are hashed while they are written
_hasher: ThreadPoolExecutor | None = None
_hasher_lock = threading.Lock()


def _hash_thread() -> ThreadPoolExecutor:
    global _hasher
    with _hasher_lock:
        if _hasher is None:
            _hasher = ThreadPoolExecutor(1, thread_name_prefix="tierflow-sha256")
        return _hasher


def write_all(fd: int, data: memoryview) -> None:
    """Write every byte of `data` at the file's position (the one place checkpoint bytes
    reach the disk: tests replace it to simulate a full disk or a slow one)."""
    while len(data):
        written = os.write(fd, data)
        data = data[written:]


# ---- writing ------------------------------------------------------------------------------
class TensorFileWriter:
    """Write a safetensors file tensor by tensor, in the order of `specs`.

    `specs`: (name, shape, dtype) of every tensor. Call `write(name, piece)` with each
    tensor's data in order (a tensor may come in several flat pieces), then `close()`,
    which checks that everything arrived, fsyncs, and returns (bytes, sha256 hex).
    """

    def __init__(self, path: Path, specs, metadata: dict | None = None):
        self.path = Path(path)
        self._order = []
        header, offset = {}, 0
        for name, shape, dtype in specs:
            nbytes = _numel(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, nbytes))
            offset += nbytes
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # tensor data starts 8-byte aligned
        self.size = 8 + len(text) + offset
        self._hash = hashlib.sha256()
        self._index = 0
        self._remaining = [nbytes for _, nbytes in self._order]
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            self._emit(memoryview(struct.pack("<Q", len(text)) + text))
        except BaseException:
            os.close(self._fd)
            raise

    def _emit(self, data: memoryview) -> None:
        """Hash and write `data`; big pieces are hashed on another thread meanwhile (both
        release the GIL), so saving costs max(disk, sha256) rather than their sum."""
        if len(data) < _OVERLAP_BYTES:
            self._hash.update(data)
            write_all(self._fd, data)
            return
        hashed = _hash_thread().submit(self._hash.update, data)
        try:
            write_all(self._fd, data)
        finally:
            hashed.result()

    def write(self, name: str, piece: torch.Tensor) -> None:
        """Append the next bytes of tensor `name` (must be the tensor now due)."""
        order, remaining = self._order, self._remaining
        while self._index < len(order) and remaining[self._index] == 0 and order[self._index][0] != name:
            self._index += 1
        if self._index == len(order) or order[self._index][0] != name:
            due = order[self._index][0] if self._index < len(order) else "nothing"
            raise TierflowError(f"{self.path.name}: got data of {name} while {due} is due")
        data = byte_view(piece.contiguous())
        if len(data) > remaining[self._index]:
            raise TierflowError(f"{self.path.name}: too many bytes for {name}")
        self._emit(data)
        remaining[self._index] -= len(data)

    def close(self) -> tuple[int, str]:
        """Finish the file: check completeness, fsync, close; returns (bytes, sha256)."""
        try:
            if any(self._remaining):
                raise TierflowError(f"{self.path.name}: closed before all tensors were written")
            os.fsync(self._fd)
        finally:
            self.abort()
        return self.size, self._hash.hexdigest()

    def abort(self) -> None:
        """Close the file descriptor (the caller removes the incomplete file)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


# ---- reading ------------------------------------------------------------------------------
class TensorFileReader:
    """Read tensors from a safetensors file one at a time with positional reads.

    The header is validated on open (JSON, known dtypes, byte ranges that tile the data
    and end at the file's end); problems raise CheckpointError naming the file.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointError(f"cannot open {self.path}: {exc.strerror}") from None
        try:
            self.entries, self.metadata, self._data_start = self._parse_header()
        except BaseException:
            self.close()
            raise

    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what}")

    def _parse_header(self):
        size = os.fstat(self._fd).st_size
        if size < 8:
            raise self._fail(f"file is truncated ({size} bytes; not a safetensors file)")
        (length,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        if length > MAX_HEADER or 8 + length > size:
            raise self._fail(f"header length {length} does not fit the file ({size} bytes): truncated or "
                             f"not a safetensors file")
        try:
            header = json.loads(os.pread(self._fd, length, 8))
        except ValueError as exc:
            raise self._fail(f"header is not valid JSON ({exc})") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        entries, end = {}, 0
        for name, info in sorted(header.items(), key=lambda kv: _start_of(kv[1])):
            try:
                dtype = CODE_DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, stop = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._fail(f"bad header entry for {name}: {info}") from None
            if begin != end or stop - begin != _numel(shape) * dtype.itemsize:
                raise self._fail(f"tensor {name}: byte range {begin}..{stop} does not match its shape "
                                 f"{list(shape)} and {info['dtype']} or leaves a gap")
            entries[name] = (dtype, shape, begin)
            end = stop
        if 8 + length + end != size:
            state = "truncated" if 8 + length + end > size else "has trailing bytes"
            raise self._fail(f"file is {size} bytes but its header describes {8 + length + end}: {state}")
        return entries, metadata, 8 + length

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name` as a new CPU tensor."""
        dtype, shape, _ = self.entries[name]
        out = torch.empty(_numel(shape), dtype=dtype)
        self.read_into(name, out)
        return out.view(shape)

    def read_into(self, name: str, out: torch.Tensor, start: int = 0) -> None:
        """Fill the flat CPU tensor `out` with elements [start, start+numel) of tensor `name`."""
        dtype, _, begin = self.entries[name]
        view = byte_view(out)
        offset = self._data_start + begin + start * dtype.itemsize
        while len(view):
            count = os.preadv(self._fd, [view], offset)
            if count == 0:
                raise self._fail(f"unexpected end of file while reading {name}")
            view, offset = view[count:], offset + count

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _start_of(info) -> int:
    try:
        return int(info["data_offsets"][0])
    except (KeyError, TypeError, ValueError, IndexError):
        return -1


def file_sha256(path: Path) -> tuple[int, str]:
    """(bytes, sha256 hex) of a file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    buffer = bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while True:
            count = f.readinto(buffer)
            if not count:
                break
            digest.update(view[:count])
            size += count
    return size, digest.hexdigest()


# ---- crash-safe file-system steps ---------------------------------------------------------
def fsync_dir(path: Path) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durably(path: Path, data: bytes) -> None:
    """Create `path` (which must not exist) with `data`, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        write_all(fd, memoryview(data))
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(name: str) -> str:
    """A name for the temporary of `name`, unique, recording the writing process."""
    return f"{name}{TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}"


def remove_stale_temporaries(directory: Path) -> None:
    """Remove temporaries in `directory` whose writing process no longer runs (killed while
    writing); those of live processes are left alone."""
    for entry in Path(directory).iterdir():
        match = _TEMPORARY.match(entry.name)
        if match is None or _alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_file_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new content."""
    path = Path(path)
    remove_stale_temporaries(path.parent)
    tmp = path.with_name(temporary_name(f".{path.name}"))
    try:
        write_bytes_durably(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_dirs(a: Path, b: Path) -> bool:
    """Atomically swap the names of two existing directories (Linux renameat2); False
    where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def os_reason(exc: OSError, path=None) -> str:
    """Why writing failed (a full disk, a read-only file system, a permission problem...)."""
    return os_problem(exc, path)


def read_windows(engine, unit, slot, names):
    """One parameter's arrays, window by window (see Engine.iter_windows)."""
    return engine.iter_windows(unit, slot, names)


def install_directory(tmp: Path, path: Path) -> None:
    """Move the complete checkpoint `tmp` to `path`, replacing an older one atomically."""
    parent = path.parent
    if not path.exists():
        os.rename(tmp, path)
        fsync_dir(parent)
        return
    if exchange_dirs(tmp, path):  # tmp now holds the old checkpoint
        fsync_dir(parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    # No exchange: two renames. A crash between them leaves the old one at `old` (named in
    # resume's error); an error or Ctrl-C between them puts it back, so `path` is never left
    # missing while the caller removes the new one.
    old = parent / f"{path.name}{OLD_MARK}{os.getpid()}-{os.urandom(4).hex()}"
    try:
        os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        if old.exists() and not path.exists():
            os.rename(old, path)
            fsync_dir(parent)
        raise
    fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)
