"""``tierflow bench io``: NvmeStore throughput against fio, and compute overlap.

What is compared (same directory, same total size, same request size):

* ``seq_write`` / ``seq_read``: NvmeStore with ``io_threads`` threads doing
  synchronous pwritev/preadv of ``chunk`` bytes each, against fio doing the
  same thing fio-style: ``--ioengine=psync --numjobs=<io_threads>
  --bs=<chunk>`` (N threads, one synchronous request each in flight), with
  huge-page buffers (``--mem=shmhuge``) like tierflow's staging buffers.
* ``*_vs_fio_4k_pages``: the same fio job with its default buffers (4 KiB
  pages).  O_DIRECT on this virtual disk is about 2x faster from huge-page
  buffers, so this row shows what the huge pages buy.
* ``*_vs_fio_libaio_qd32``: fio's usual best case (libaio, 1 MiB, queue
  depth 32, default buffers).
* ``compute_overlap``: matmuls per second on the main thread while NvmeStore
  streams in the background, against the same loop alone (target >= 0.9).

Writes are O_DIRECT without fsync on both sides (O_DIRECT bypasses the page
cache); in buffered mode both sides fsync at the end.  The page cache is
dropped before every read measurement when running as root.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from tierflow.memory.nvme import NvmeStore
from tierflow.memory.pool import BufferPool

__all__ = ["run_io_bench", "parse_size"]

GB = 1e9  # throughput in decimal GB/s, as fio and disk vendors report it
FIO_FILE = "fio-bench.bin"


def parse_size(text: str) -> int:
    """'2G', '512M', '64k' or plain bytes -> bytes (binary units)."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def drop_caches() -> bool:
    """Drop the page cache (root only) so reads come from the disk."""
    if not _is_root():
        return False
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def find_fio(install: bool = True) -> str | None:
    """Path of fio; installs it with apt-get when missing and running as root."""
    path = shutil.which("fio")
    if path or not install or not _is_root() or not shutil.which("apt-get"):
        return path
    print("fio not found: installing it with apt-get ...", flush=True)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    subprocess.run(["apt-get", "update"], check=False, **quiet)
    subprocess.run(["apt-get", "install", "-y", "fio"], check=False, **quiet)
    return shutil.which("fio")


# ------------------------------------------------------------------ tierflow side


def _stream(store: NvmeStore, extent, pool: BufferPool, write: bool) -> None:
    """Write or read the whole extent through the pool's buffers, keeping one
    request per buffer in flight (the double-buffering an engine would do)."""
    step = pool.nbytes
    pending = []
    for start in range(0, extent.nbytes, step):
        buf = pool.acquire()
        n = min(step, extent.nbytes - start)
        io = store.write_async if write else store.read_async
        fut = io(extent, buf[:n], start)
        fut.add_done_callback(lambda f, b=buf: pool.release(b))
        pending.append(fut)
    for fut in pending:
        fut.result()


def _tierflow_gbps(store: NvmeStore, extent, pool: BufferPool, write: bool) -> float:
    if not write:
        drop_caches()
    t0 = time.perf_counter()
    _stream(store, extent, pool, write)
    if write and not store.direct:
        store.sync()  # buffered: count the time to reach the disk
    return extent.nbytes / (time.perf_counter() - t0) / GB


# ----------------------------------------------------------------------- fio side


@dataclass(frozen=True)
class FioJob:
    """One fio reference configuration."""

    suffix: str  # appended to the row name ("" = the matched reference)
    engine: str
    bs: int
    numjobs: int
    iodepth: int
    mem: str  # fio --mem: "shmhuge" (huge pages) or "malloc" (4 KiB pages)

    def command(self, fio: str, directory: Path, size: int, write: bool, direct: bool,
                file_name: str = "") -> list[str]:
        per_job = size // self.numjobs
        cmd = [
            fio, "--name=tierflow-ref", f"--filename={directory / (file_name or FIO_FILE)}",
            f"--rw={'write' if write else 'read'}", f"--bs={self.bs}", f"--direct={int(direct)}",
            f"--ioengine={self.engine}", f"--iodepth={self.iodepth}",
            f"--numjobs={self.numjobs}", f"--size={per_job}", f"--offset_increment={per_job}",
            f"--mem={self.mem}", "--group_reporting", "--output-format=json",
        ]
        if write and not direct:
            cmd.append("--end_fsync=1")
        return cmd


def fio_jobs(chunk: int, io_threads: int, huge_pages: bool) -> list[FioJob]:
    """The matched job first (huge-page buffers when available), then the extras."""
    jobs = [FioJob("", "psync", chunk, io_threads, 1, "shmhuge" if huge_pages else "malloc")]
    if huge_pages:
        jobs.append(FioJob("_vs_fio_4k_pages", "psync", chunk, io_threads, 1, "malloc"))
    jobs.append(FioJob("_vs_fio_libaio_qd32", "libaio", 1 << 20, 1, 32, "malloc"))
    return jobs


def fio_gbps(fio: str, job: FioJob, directory: Path, size: int, write: bool,
              direct: bool, file_name: str = "") -> float:
    if not write:
        drop_caches()
    cmd = job.command(fio, directory, size, write, direct, file_name)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(out[out.index("{"):])["jobs"][0]  # skip warnings before the JSON
    return result["write" if write else "read"]["bw_bytes"] / GB


@contextlib.contextmanager
def huge_pages_for_fio(nbytes: int) -> Iterator[bool]:
    """Make ``nbytes`` of hugetlb pages available to fio's --mem=shmhuge.

    Reserves them (root only) when too few are free and gives them back
    afterwards; yields False when that is not possible.
    """
    nr_path = Path("/proc/sys/vm/nr_hugepages")
    need = -(-nbytes // (2 << 20))
    try:
        free = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                        if line.startswith("HugePages_Free:")))
        before = int(nr_path.read_text())
    except (OSError, StopIteration, ValueError):
        yield False
        return
    if free >= need:
        yield True
        return
    if not _is_root():
        yield False
        return
    try:
        nr_path.write_text(f"{before + need - free}\n")
        yield int(nr_path.read_text()) >= before + need - free
    finally:
        nr_path.write_text(f"{before}\n")


# ------------------------------------------------------------------ compute overlap


def _matmuls_per_second(seconds: float, n: int = 512) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm up
    count, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        torch.mm(a, b)
        count += 1
    return count / elapsed


def _compute_overlap(store: NvmeStore, extent, pool: BufferPool, seconds: float,
                     rounds: int = 8):
    """(matmul/s with background I/O, matmul/s alone, I/O GB/s during overlap).

    Alternates short "alone" and "with I/O" periods so that load from other
    processes or a drifting clock affects both sides alike.
    """
    step = pool.nbytes
    alone, with_io, moved, io_time = [], [], 0, 0.0
    pos = {"write": True, "start": 0}  # carried across rounds: a mix of writes and reads
    for _ in range(rounds):
        alone.append(_matmuls_per_second(seconds / rounds))
        stop = threading.Event()
        done = [0]

        def background_io():
            # Alternate writing and reading the extent, one buffer per
            # request and two in flight, until told to stop.
            pending = []
            while not stop.is_set():
                buf = pool.acquire()
                n = min(step, extent.nbytes - pos["start"])
                io = store.write_async if pos["write"] else store.read_async
                fut = io(extent, buf[:n], pos["start"])
                fut.add_done_callback(lambda f, b=buf: pool.release(b))
                pending.append(fut)
                done[0] += n
                pos["start"] += n
                if pos["start"] >= extent.nbytes:
                    pos["write"], pos["start"] = not pos["write"], 0
            for fut in pending:
                fut.result()

        thread = threading.Thread(target=background_io, daemon=True)
        t0 = time.perf_counter()
        thread.start()
        with_io.append(_matmuls_per_second(seconds / rounds))
        stop.set()
        thread.join()
        io_time += time.perf_counter() - t0
        moved += done[0]
    # Medians: a burst of load from another process spoils one round, not the figure.
    return statistics.median(with_io), statistics.median(alone), moved / io_time / GB


# ----------------------------------------------------------------------- driver


def _row(name: str, tierflow: float, reference: float | None, unit: str) -> dict:
    ratio = tierflow / reference if reference else None
    return {"name": name, "tierflow": round(tierflow, 3),
            "reference": None if reference is None else round(reference, 3),
            "ratio": None if ratio is None else round(ratio, 3), "unit": unit}


def _print_row(row: dict) -> None:
    def fmt(x, spec):
        return "-" if x is None else format(x, spec)
    print(f"{row['name']:30s} tierflow {fmt(row['tierflow'], '9.2f')}  "
          f"reference {fmt(row['reference'], '9.2f')}  ratio {fmt(row['ratio'], '5.2f')}  "
          f"{row['unit']}", flush=True)


def run_io_bench(directory: str | Path, size_bytes: int = 2 << 30, json_path: str | Path | None = None,
                 *, io_threads: int = 2, chunk_bytes: int = 8 << 20, buffer_bytes: int = 64 << 20,
                 repeats: int = 5, overlap_seconds: float = 6.0) -> list[dict]:
    """Benchmark the NVMe tier in ``directory``; print and return one row per comparison.

    Throughputs are medians over ``repeats`` runs, tierflow and fio interleaved
    so that drifting disk speed affects both alike.
    """
    directory = Path(directory)
    unit = 2 * chunk_bytes * io_threads  # whole chunks for every fio job
    size = max(unit, size_bytes // unit * unit)
    fio = find_fio()
    rows: list[dict] = []
    with NvmeStore(directory, io_threads=io_threads, chunk_bytes=chunk_bytes) as store:
        store.check_space(2 * size)  # our spill file plus fio's file
        print(f"tierflow bench io: {directory} ({store.mode}), {size / 2**30:.2f} GiB, "
              f"{io_threads} I/O threads, {chunk_bytes >> 20} MiB requests, "
              f"{repeats} repeats (median); page cache dropped before reads: {_is_root()}")
        if hasattr(os, "getloadavg"):
            load = os.getloadavg()[0]
            print(f"load average {load:.2f} on {os.cpu_count()} CPUs"
                  + (" -- other processes are running: figures will be noisy" if load > 0.5 else ""))
        if fio is None:
            print("fio is MISSING (install it: apt-get install fio): "
                  "reporting tierflow figures alone, without a reference")
        pool = BufferPool(2, buffer_bytes)
        extent = store.allocate(size)
        try:
            # fio's buffers: numjobs * bs, plus slack for its alignment.
            with huge_pages_for_fio(io_threads * chunk_bytes + (8 << 20)) as huge:
                jobs = fio_jobs(chunk_bytes, io_threads, huge) if fio else []
                for job in jobs:
                    cmd = job.command(fio, directory, size, True, store.direct)
                    shown = ["fio"] + [arg for arg in cmd[1:] if "output-format" not in arg]
                    print("reference: " + " ".join(shown).replace("--rw=write", "--rw=write|read"))
                if fio and not huge:
                    print("(no huge pages for fio: its buffers use 4 KiB pages, tierflow's "
                          "use transparent huge pages)")
                rows += _throughput_rows(store, extent, pool, fio, jobs, directory, size, repeats)
            with_io, alone, io_gbps = _compute_overlap(store, extent, pool, overlap_seconds)
            rows.append(_row("compute_overlap", with_io, alone, "matmul/s"))
            _print_row(rows[-1])
            print(f"  (I/O moved {io_gbps:.2f} GB/s in the background meanwhile; "
                  f"torch threads: {torch.get_num_threads()})")
        finally:
            store.free(extent)
            (directory / FIO_FILE).unlink(missing_ok=True)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def _throughput_rows(store, extent, pool, fio, jobs, directory, size, repeats) -> list[dict]:
    """Interleave tierflow and each fio job ``repeats`` times; one row per job."""
    ours = {True: [], False: []}
    theirs = {(job, write): [] for job in jobs for write in (True, False)}
    for _ in range(repeats):
        for write in (True, False):  # write first: the reads need the data
            ours[write].append(_tierflow_gbps(store, extent, pool, write))
            for job in jobs:
                theirs[job, write].append(
                    fio_gbps(fio, job, directory, size, write, store.direct))
    rows = []
    for write, label in ((True, "seq_write"), (False, "seq_read")):
        mine = statistics.median(ours[write])
        if not jobs:
            rows.append(_row(label, mine, None, "GB/s"))
            _print_row(rows[-1])
        for job in jobs:
            rows.append(_row(label + job.suffix, mine, statistics.median(theirs[job, write]), "GB/s"))
            _print_row(rows[-1])
    return rows
