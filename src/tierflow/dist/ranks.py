"""Data-parallel sharding over torch.distributed (ZeRO-3 / ZeRO-Infinity layout).

The only module that issues collectives. With N ranks every unit's flat buffers
(padded to a multiple of N * SEGMENT_ALIGN elements by `layout.partition`) are cut
into N equal contiguous shards; rank r keeps shard r of master weights, gradients
and Adam moments in its own tiers (`tiers.StateIO` clips every window to it).

- weights: a unit's device buffer is filled with the local shard (fetched and
  updated as in one process), then all-gathered in place when the unit is
  acquired for use (`gather`).
- gradients: a unit's gradients are summed into one fp32 bucket, reduce-scattered
  and divided by N (`reduce_scatter`), so each rank accumulates only its shard and
  N ranks x batch b equal one process x batch N*b for a mean loss.
- clipping: the global norm is the all-reduced sum of squared shard norms.

Every rank issues the same collectives in the same order: gathers from the thread
that runs the model, when a unit is first held (model order) or, one unit ahead, when
the unit before it is (trace order; `gather_ahead`); reduce-scatters from the drain
thread, in autograd's gradient order, on their own process group so the two
streams never interleave on one group. A failed or timed-out collective (a dead
rank) raises `TierflowError` naming the rank and the operation.
"""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tierflow.errors import TierflowError

TIMEOUT_ENV = "TIERFLOW_DIST_TIMEOUT"  # seconds a collective may wait for the other ranks
DEFAULT_TIMEOUT_S = 300.0
SINGLE_RANK_ENV = "TIERFLOW_SHARD_SINGLE_RANK"  # "1": shard even a world of one (benchmarks, NCCL tests)


def timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_from_env(device: str = "cpu") -> bool:
    """Initialise the default process group from torchrun's environment (NCCL for CUDA,
    gloo for CPU) with tierflow's timeout; False when not launched by torchrun."""
    if not under_torchrun() or not dist.is_available():
        return False
    if not dist.is_initialized():
        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout())
    return True


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (or without a process group): the rank that prints and writes shared files."""
    return rank() == 0


@dataclass(frozen=True)
class Shard:
    """Elements [lo, hi) of a unit's padded flat buffers: this rank's part."""

    lo: int
    hi: int


class Dist:
    """The collectives of one engine; create with `detect()`."""

    def __init__(self):
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.backend = dist.get_backend()
        # One group per issuing thread: collectives of different threads never interleave.
        self.main = dist.new_group(timeout=timeout())
        self.drain = dist.new_group(timeout=timeout())
        self._gathered: dict[int, object] = {}  # unit id -> True, or (work, input) in flight
        # Seconds each thread spent blocked in collectives, and bytes received (benchmarks).
        self.stats = {"gather_wait_s": 0.0, "reduce_scatter_s": 0.0, "gathered_bytes": 0, "scattered_bytes": 0}

    def shard(self, numel: int) -> Shard:
        size = numel // self.world
        assert size * self.world == numel, "unit buffers are padded to a multiple of the world size"
        return Shard(self.rank * size, (self.rank + 1) * size)

    def _run(self, what: str, fn):
        try:
            return fn()
        except TierflowError:
            raise
        except Exception as exc:  # gloo/NCCL raise RuntimeError and DistBackendError subclasses
            raise TierflowError(
                f"rank {self.rank}/{self.world}: {what} failed; another rank has probably died or stopped "
                f"responding (collective timeout {timeout().total_seconds():.0f} s, ${TIMEOUT_ENV}): "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc

    def gather(self, uid: int, flat: torch.Tensor, lo: int, hi: int, name: str) -> None:
        """Complete unit `uid`'s weights in `flat` (whose [lo, hi) holds this rank's part):
        wait for the all-gather started by `gather_ahead`, or all-gather now."""
        state = self._gathered.get(uid)
        if state is None:
            self.gather_ahead(uid, flat, lo, hi, name)
            state = self._gathered[uid]
        if state is not True:
            start = time.perf_counter()
            self._run(f"all-gather of the weights of unit '{name}'", state[0].wait)
            self.stats["gather_wait_s"] += time.perf_counter() - start
            self._gathered[uid] = True

    def gather_ahead(self, uid: int, flat: torch.Tensor, lo: int, hi: int, name: str) -> None:
        """Start the in-place all-gather of unit `uid` (overlapping the compute of the unit
        before it); `gather` waits for it."""
        local = flat[lo:hi]
        if self.backend != "nccl":
            local = local.clone()  # gloo does not take an input aliasing the output
        work = self._run(f"all-gather of the weights of unit '{name}'",
                         lambda: _all_gather(flat, local, self.main, async_op=True))
        self.stats["gathered_bytes"] += (flat.numel() - local.numel()) * flat.element_size()
        self._gathered[uid] = (work, local)  # the input must live until the gather is done

    def is_gathered(self, uid: int) -> bool:
        """True from the start of a unit's all-gather until `forget`."""
        return uid in self._gathered

    def forget(self, uid: int) -> None:
        """The unit's buffer no longer counts as gathered (released, or evicted)."""
        state = self._gathered.pop(uid, None)
        if state is not None and state is not True:
            self._run("all-gather of the weights of a unit being evicted", state[0].wait)

    def reduce_scatter(self, bucket: torch.Tensor, name: str) -> torch.Tensor:
        """Average a unit's full gradient bucket over ranks; returns this rank's shard."""
        out = torch.empty(bucket.numel() // self.world, dtype=bucket.dtype, device=bucket.device)
        start = time.perf_counter()
        self._run(f"reduce-scatter of the gradients of unit '{name}'",
                  lambda: _reduce_scatter(out, bucket, self.drain))
        self.stats["reduce_scatter_s"] += time.perf_counter() - start
        self.stats["scattered_bytes"] += (bucket.numel() - out.numel()) * bucket.element_size()
        return out.div_(self.world)

    def all_reduce_sum(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """Sum `tensor` over ranks in place (main thread only)."""
        if self.backend == "nccl" and tensor.device.type == "cpu":  # NCCL reduces device memory only
            moved = tensor.cuda()
            self._run(what, lambda: dist.all_reduce(moved, group=self.main))
            return tensor.copy_(moved)
        self._run(what, lambda: dist.all_reduce(tensor, group=self.main))
        return tensor

    def global_norm(self, local_norms: list[torch.Tensor], device) -> torch.Tensor:
        """L2 norm over all ranks' shard norms (each element of a gradient is on one rank)."""
        local = (torch.stack(local_norms).double().square().sum() if local_norms
                 else torch.zeros((), dtype=torch.float64, device=device))
        total = self.all_reduce_sum(local.to(device), "all-reduce of the gradient norm")
        return total.sqrt().float()

    def barrier(self, what: str) -> None:
        self._run(what, lambda: dist.barrier(group=self.main))

    def broadcast_object(self, obj, what: str):
        box = [obj]
        self._run(what, lambda: dist.broadcast_object_list(box, src=0, group=self.main))
        return box[0]

    def gather_objects(self, obj, what: str) -> list:
        out = [None] * self.world
        self._run(what, lambda: dist.all_gather_object(out, obj, group=self.main))
        return out


def _all_gather(out, local, group, async_op: bool = False):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, local, group=group, async_op=async_op)


def _reduce_scatter(out, bucket, group) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, bucket, group=group)


def detect() -> Dist | None:
    """The engine's collectives when a process group with more than one rank is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_world_size() < 2 and os.environ.get(SINGLE_RANK_ENV) != "1":
        return None  # one rank: the plain engine, bit for bit
    return Dist()
