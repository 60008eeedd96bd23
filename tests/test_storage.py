"""Tests of the NVMe tier (NvmeStore) and host staging buffers (BufferPool)."""

import errno
import os
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from tierflow.errors import NvmeError, TierflowError
from tierflow.memory.nvme import Extent, NvmeStore
from tierflow.memory.pool import BufferPool, aligned_empty

KIB, MIB = 1 << 10, 1 << 20


@pytest.fixture(params=[None, False], ids=["direct-auto", "buffered"])
def store(request, tmp_path):
    with NvmeStore(tmp_path / "nvme", direct=request.param, chunk_bytes=1 * MIB) as s:
        yield s


def random_bytes(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    buf = aligned_empty(n)
    buf.copy_(torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen))
    return buf


# ---------------------------------------------------------------- aligned_empty / pool


@pytest.mark.parametrize("nbytes", [0, 1, 4095, 4096, 12345, 3 * MIB])
@pytest.mark.parametrize("alignment", [512, 4096, 65536])
def test_aligned_empty_alignment(nbytes, alignment):
    t = aligned_empty(nbytes, alignment)
    assert t.dtype == torch.uint8 and t.numel() == nbytes and t.device.type == "cpu"
    assert t.data_ptr() % alignment == 0
    t.fill_(7)  # the whole range is writable


def test_large_buffers_are_huge_page_aligned():
    t = aligned_empty(8 * MIB, alignment=4096)
    assert t.numel() == 8 * MIB and t.data_ptr() % (2 * MIB) == 0
    t.fill_(1)


def test_aligned_empty_rejects_bad_alignment():
    with pytest.raises(ValueError):
        aligned_empty(10, alignment=3000)


@pytest.mark.skipif(torch.cuda.is_available(), reason="pinning works with CUDA")
def test_pin_falls_back_with_one_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = aligned_empty(8192, pin=True)
        pool = BufferPool(4, 8192, pin=True)
    assert not t.is_pinned() and t.data_ptr() % 4096 == 0
    assert not pool.pinned
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2  # one per allocation, not one per pool buffer
    assert "pinned" in messages[0] and "pin=False" in messages[0]


def test_pool_acquire_release_and_properties():
    pool = BufferPool(3, 10_000)
    assert pool.nbytes_total == 30_000 and pool.available == 3 and not pool.pinned
    bufs = [pool.acquire() for _ in range(3)]
    assert len({b.data_ptr() for b in bufs}) == 3
    for b in bufs:
        assert b.numel() == 10_000 and b.data_ptr() % 4096 == 0
    # Buffers do not overlap.
    for i, b in enumerate(bufs):
        b.fill_(i)
    assert [int(b[-1]) for b in bufs] == [0, 1, 2]
    assert pool.available == 0
    for b in bufs:
        pool.release(b)
    assert pool.available == 3


def test_pool_timeout_and_blocking():
    pool = BufferPool(1, 4096)
    buf = pool.acquire()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="in use"):
        pool.acquire(timeout=0.05)
    assert time.monotonic() - t0 >= 0.04

    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(timeout=5)))
    waiter.start()
    time.sleep(0.05)
    assert not got  # still blocked
    pool.release(buf)
    waiter.join(5)
    assert got and got[0].data_ptr() == buf.data_ptr()


def test_pool_release_errors():
    pool = BufferPool(2, 4096)
    buf = pool.acquire()
    pool.release(buf)
    with pytest.raises(ValueError, match="twice"):
        pool.release(buf)
    with pytest.raises(ValueError, match="not a buffer"):
        pool.release(aligned_empty(4096))
    with pytest.raises(ValueError, match="not a buffer"):
        pool.release(pool.acquire()[:100])


def test_pool_context_manager_releases_on_error():
    pool = BufferPool(1, 4096)
    with pytest.raises(RuntimeError, match="boom"):
        with pool.buffer() as buf:
            assert pool.available == 0 and buf.numel() == 4096
            raise RuntimeError("boom")
    assert pool.available == 1


def test_pool_many_threads():
    """Never more holders than buffers, and a waiting thread gets a buffer once one is freed."""
    pool = BufferPool(2, 4096)
    in_use, peak, lock = [0], [0], threading.Lock()
    both_held = threading.Barrier(2, timeout=10)  # the first two holders meet: the limit is reached

    def worker(first: bool):
        for i in range(20):
            with pool.buffer(timeout=10):
                with lock:
                    in_use[0] += 1
                    peak[0] = max(peak[0], in_use[0])
                if first and i == 0:
                    both_held.wait()
                time.sleep(0.001)  # hold it long enough for the others to contend
                with lock:
                    in_use[0] -= 1

    firsts = [threading.Thread(target=worker, args=(True,)) for _ in range(2)]
    for t in firsts:
        t.start()
    while pool.available:  # both first workers hold their buffer (at the barrier) ...
        time.sleep(0.001)
    others = [threading.Thread(target=worker, args=(False,)) for _ in range(4)]
    for t in others:  # ... so these must wait for one to be given back
        t.start()
    for t in firsts + others:
        t.join()
    assert peak[0] == 2 and pool.available == 2


# ---------------------------------------------------------------- NvmeStore setup


def test_creates_directory_and_cleans_up(tmp_path):
    d = tmp_path / "a" / "b" / "c"
    s = NvmeStore(d)
    assert d.is_dir() and not s.path.exists()  # unlinked once open: nothing left behind on a crash
    assert s.size_on_disk() == 0
    assert s.mode in ("O_DIRECT", "buffered (file system does not support O_DIRECT)")
    assert s.direct == (s.mode == "O_DIRECT")
    s.close()
    s.close()  # idempotent
    assert not s.path.exists()
    with pytest.raises(NvmeError, match="closed"):
        s.read(Extent(0, 4096), aligned_empty(4096))


def test_ext4_uses_o_direct(tmp_path):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    with NvmeStore(tmp_path) as s:  # tmp_path is on the ext4 root disk here
        assert s.direct and s.mode == "O_DIRECT"


def test_unwritable_directory(tmp_path):
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(NvmeError) as info:
        NvmeStore(regular / "sub")  # parent is a regular file: even root cannot
    assert str(regular / "sub") in str(info.value)
    assert isinstance(info.value, TierflowError) and isinstance(info.value, OSError)


def test_fallback_when_o_direct_rejected(tmp_path, monkeypatch):
    """Simulate tmpfs-style EINVAL on O_DIRECT open: direct=None falls back,
    direct=True refuses with a clear error."""
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    real_open = os.open

    def no_direct_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct_open)
    with NvmeStore(tmp_path) as s:
        assert not s.direct and s.mode == "buffered (file system does not support O_DIRECT)"
        ext = s.allocate(100)
        data = random_bytes(100)
        s.write(ext, data)  # unaligned lengths are fine when buffered
        out = torch.empty(100, dtype=torch.uint8)
        s.read(ext, out)
        assert torch.equal(out, data)
    with pytest.raises(NvmeError, match="O_DIRECT"):
        NvmeStore(tmp_path, direct=True)


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
def test_dev_shm_auto_mode(tmp_path):
    """On tmpfs, direct=None must produce a working store. Kernels before 6.6
    reject O_DIRECT on tmpfs (-> buffered); newer ones accept it."""
    d = Path("/dev/shm") / f"tierflow-test-{os.getpid()}"
    try:
        with NvmeStore(d, direct=None) as s:
            assert s.mode in ("O_DIRECT", "buffered (file system does not support O_DIRECT)")
            ext = s.allocate(8192)
            data = random_bytes(8192)
            s.write(ext, data)
            out = aligned_empty(8192)
            s.read(ext, out)
            assert torch.equal(out, data)
    finally:
        if d.exists():
            d.rmdir()


# ---------------------------------------------------------------- allocator


def test_allocate_free_reuse_and_growth(tmp_path):
    with NvmeStore(tmp_path) as s:
        a = s.allocate(1)
        b = s.allocate(5000)
        c = s.allocate(4096)
        assert (a, b, c) == (Extent(0, 4096), Extent(4096, 8192), Extent(12288, 4096))
        assert s.reserved_bytes == 16384 and s.file_bytes == 16384
        assert s.size_on_disk() == 16384
        s.free(b)
        assert s.reserved_bytes == 8192
        d = s.allocate(4096)  # first fit reuses b's hole
        assert d == Extent(4096, 4096)
        e = s.allocate(4096)  # the rest of the hole
        assert e == Extent(8192, 4096)
        f = s.allocate(4096)  # no hole left: grows the file
        assert f == Extent(16384, 4096) and s.size_on_disk() == 20480
        with pytest.raises(ValueError, match="double free"):
            s.free(b)
        for ext in (a, c, d, e, f):
            s.free(ext)
        assert s.reserved_bytes == 0
        # Everything merged back: a large allocation starts at 0 again.
        assert s.allocate(20480) == Extent(0, 20480)
        assert s.allocate(0) == Extent(0, 0)
        s.free(Extent(0, 0))


def test_allocator_merges_neighbours(tmp_path):
    with NvmeStore(tmp_path) as s:
        exts = [s.allocate(4096) for _ in range(5)]
        for i in (1, 3, 2):  # free the middle three out of order
            s.free(exts[i])
        assert s.allocate(3 * 4096) == Extent(4096, 3 * 4096)


def test_check_space(tmp_path):
    with NvmeStore(tmp_path) as s:
        free = s.check_space(1 * MIB)
        assert free > 0
        with pytest.raises(NvmeError, match="free but the plan spills") as info:
            s.check_space(free + 2**40)
        assert info.value.errno == errno.ENOSPC
        assert str(tmp_path) in str(info.value) and "larger disk" in str(info.value)


# ---------------------------------------------------------------- I/O


@pytest.mark.parametrize("nbytes", [4096, 64 * KIB, 1 * MIB, 3 * MIB + 8192])
def test_round_trip_sizes(store, nbytes):
    ext = store.allocate(nbytes)
    data = random_bytes(nbytes, seed=nbytes)
    store.write(ext, data)
    out = aligned_empty(nbytes)
    store.read(ext, out)
    assert torch.equal(out, data)


def test_round_trip_offsets_and_dtypes(store):
    ext = store.allocate(64 * KIB)
    x = torch.randn(4096, dtype=torch.float32)  # 16 KiB
    y = torch.randn(2048, dtype=torch.bfloat16)  # 4 KiB
    xa = aligned_empty(x.numel() * 4).view(torch.float32).copy_(x)
    ya = aligned_empty(y.numel() * 2).view(torch.bfloat16).copy_(y)
    store.write(ext, xa, start=0)
    store.write(ext, ya, start=32 * KIB)
    xo = aligned_empty(x.numel() * 4).view(torch.float32)
    yo = aligned_empty(y.numel() * 2).view(torch.bfloat16)
    store.read(ext, yo, start=32 * KIB)
    store.read(ext, xo)
    assert torch.equal(xo, x) and torch.equal(yo, y)
    # A partial read of the middle of x.
    part = aligned_empty(4096)
    store.read(ext, part, start=8192)
    assert torch.equal(part, xa.view(torch.uint8)[8192:12288])


def test_async_many_concurrent_requests(store):
    n, size = 40, 24 * KIB
    exts = [store.allocate(size) for _ in range(n)]
    datas = [random_bytes(size, seed=i) for i in range(n)]
    futs = [store.write_async(e, d) for e, d in zip(exts, datas)]
    assert [f.result(timeout=10) for f in futs] == [size] * n
    outs = [aligned_empty(size) for _ in range(n)]
    futs = [store.read_async(e, o) for e, o in zip(exts, outs)]
    for f in futs:
        f.result(timeout=10)
    assert all(torch.equal(o, d) for o, d in zip(outs, datas))
    assert store.bytes_written == n * size and store.bytes_read == n * size


def test_large_request_is_split_and_uses_threads(tmp_path, monkeypatch):
    seen = set()
    real = os.pwritev

    def spy(fd, bufs, off):
        seen.add(threading.current_thread().name)
        time.sleep(0.01)  # make sure both threads get pieces
        return real(fd, bufs, off)

    monkeypatch.setattr(os, "pwritev", spy)
    with NvmeStore(tmp_path, io_threads=2, chunk_bytes=64 * KIB) as s:
        ext = s.allocate(1 * MIB)
        data = random_bytes(1 * MIB)
        s.write(ext, data)
        out = aligned_empty(1 * MIB)
        s.read(ext, out)
        assert torch.equal(out, data)
    assert {"tierflow-nvme_0", "tierflow-nvme_1"} <= seen


def test_short_reads_and_writes_are_completed(tmp_path, monkeypatch):
    real_w, real_r = os.pwritev, os.preadv

    def short_write(fd, bufs, off):  # at most 4 KiB per call
        return real_w(fd, [bufs[0][:4096]], off)

    def short_read(fd, bufs, off):
        return real_r(fd, [bufs[0][:4096]], off)

    monkeypatch.setattr(os, "pwritev", short_write)
    monkeypatch.setattr(os, "preadv", short_read)
    with NvmeStore(tmp_path) as s:
        ext = s.allocate(64 * KIB)
        data = random_bytes(64 * KIB)
        s.write(ext, data)
        out = aligned_empty(64 * KIB)
        s.read(ext, out)
        assert torch.equal(out, data)


def test_request_validation(tmp_path):
    with NvmeStore(tmp_path) as s:
        ext = s.allocate(8192)
        with pytest.raises(ValueError, match="does not fit"):
            s.write(ext, aligned_empty(8192), start=4096)
        with pytest.raises(ValueError, match="contiguous"):
            s.write(ext, torch.zeros(8, 8).t())
        if s.direct:
            with pytest.raises(ValueError, match="multiples of 4096"):
                s.write(ext, aligned_empty(100))  # length
            with pytest.raises(ValueError, match="multiples of 4096"):
                s.write(ext, aligned_empty(8192)[1:4097])  # address
            with pytest.raises(ValueError, match="multiples of 4096"):
                s.write(ext, aligned_empty(4096), start=512)  # offset
        assert s.write_async(ext, torch.empty(0)).result() == 0


def test_enospc_surfaces_as_nvme_error(tmp_path, monkeypatch):
    def disk_full(fd, bufs, off):
        raise OSError(errno.ENOSPC, "No space left on device")

    with NvmeStore(tmp_path, chunk_bytes=64 * KIB) as s:
        ext = s.allocate(256 * KIB)
        monkeypatch.setattr(os, "pwritev", disk_full)
        fut = s.write_async(ext, aligned_empty(256 * KIB))
        with pytest.raises(NvmeError, match="disk full") as info:
            fut.result(timeout=10)
        assert info.value.errno == errno.ENOSPC
        assert str(s.path) in str(info.value) and "offset" in str(info.value)


def test_eio_surfaces_as_nvme_error(tmp_path, monkeypatch):
    def io_error(fd, bufs, off):
        raise OSError(errno.EIO, "Input/output error")

    with NvmeStore(tmp_path) as s:
        ext = s.allocate(8192)
        monkeypatch.setattr(os, "preadv", io_error)
        with pytest.raises(NvmeError, match="at offset 0 of") as info:
            s.read(ext, aligned_empty(8192))
        assert info.value.errno == errno.EIO


def test_enospc_when_growing(tmp_path, monkeypatch):
    def no_space(fd, off, n):
        raise OSError(errno.ENOSPC, "No space left on device")

    with NvmeStore(tmp_path) as s:
        monkeypatch.setattr(os, "posix_fallocate", no_space)
        with pytest.raises(NvmeError, match="disk full"):
            s.allocate(1 * MIB)
        assert s.reserved_bytes == 0


def test_close_waits_for_pending_io(tmp_path):
    s = NvmeStore(tmp_path, chunk_bytes=256 * KIB)
    ext = s.allocate(4 * MIB)
    fut = s.write_async(ext, random_bytes(4 * MIB))
    s.close()
    assert fut.done() and fut.exception() is None
    assert not s.path.exists()


@pytest.mark.skipif(not os.uname().sysname == "Linux", reason="per-thread nice is Linux only")
def test_io_threads_run_at_lower_priority(tmp_path):
    base = os.getpriority(os.PRIO_PROCESS, 0)
    with NvmeStore(tmp_path, io_nice=5) as s:
        nice = s._executor.submit(lambda: os.getpriority(os.PRIO_PROCESS, 0)).result()
    assert nice == min(19, base + 5)
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the caller is untouched
