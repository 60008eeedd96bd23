"""Data-parallel sharding over torch.distributed (gloo, CPU): 2 ranks launched like torchrun
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) run tests/dist_worker.py.

The reference is one process that runs each optimizer step's whole batch as the ranks'
micro-batches (the rows each rank gets, each loss divided by 2, gradients accumulated:
`--as-ranks 2`). Its gradient is then bit for bit the ranks' one: the engine keeps g0/2 and
adds g1/2, fl(g0/2 + g1/2) = fl(g0 + g1)/2 exactly (halving is exact, and a sum of two
operands does not depend on their order), which is what the reduce-scatter (sum over 2 ranks)
followed by the division by 2 gives; every micro-batch runs the same kernels on the same
shapes as the rank that gets its rows (OMP_NUM_THREADS=1 in both).

Why not one process with batch 4: the gradient of a batch of 4 sums the rows in another
order than (rows 0-1) + (rows 2-3), so it differs in the last bits, and AdamW turns such a
difference into an lr-sized one where the gradient is near zero: its first update is
lr * g / (|g| + eps) (about lr * sign(g) for |g| >> eps), so for |g| ~ eps a perturbation dg
moves the weight by up to lr * dg / eps, and a gradient that is rounding noise (GPT-2's key
bias: softmax is shift-invariant, its true gradient is 0) may flip sign, 2 * lr per step. That
comparison failed on 1 of 3072 GPT-2 weights (2.7e-5 after 3 steps, lr 1e-2); the only bound
that holds for such elements, 2 * lr * steps = 0.06, tests nothing. (That accumulating
micro-batches equals the whole batch is the plain engine's exactness against torch,
tests/test_engine_exact.py.)

What remains different is the global gradient norm, by design: one process takes torch's fp32
norm of the per-parameter norms, ranks combine their shard norms in fp64 (`Dist.global_norm`).
Each run's norm carries at most log2(n) + 2 <= 14 roundings of relative 2**-24 (a cascade sum
of n <= 4096 squares in fp32, the square root, the fp32 results; fewer where torch accumulates
in fp64), so the two may differ by 2 * 14 * 2**-24 = 1.7e-6 relative (measured: 1 ulp, 6e-8):
NORM_RTOL = 2e-6.
- With clipping that does not engage (max_norm above every norm: the coefficient is exactly 1)
  the runs are bit for bit equal: losses, weights, moments (`assert_same`).
- With clipping that engages, the coefficient max_norm / (norm + 1e-6) differs by
  d <= NORM_RTOL + 2 * 2**-24 relative, a uniform scale of every gradient. After one AdamW step
  that moves a weight by lr * x / (|x| + eps), x = c * g, by at most
  lr * d * max(eps * |x| / (|x| + eps)**2) = lr * d / 4 (no amplification, whatever |g|), plus
  the roundings of the update in each run (the clip multiply, lerp, addcmul, sqrt, two
  divisions, the eps add, the step-size multiply: <= 8 of 2**-24 * lr each, |update| <= lr at
  step 1) and of the new weight (half an ulp each, 1 ulp <= 2**-23 |w| in all):
  |dw| <= lr * (d / 4 + 16 * 2**-24) + 2**-23 |w|. More steps are not compared with clipping: from
  step 2 on the weights differ by an ulp, the recomputed gradients differ in absolute terms, and
  near-zero gradients are chaotic again (see above).
The models run without dropout (eval mode): masks would differ per batch split.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch


WORKER = str(Path(__file__).with_name("dist_worker.py"))
SRC = str(Path(__file__).resolve().parents[1] / "src")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(world: int, *args, timeout_s: float = 60, env_extra=None):
    """Run the worker on `world` ranks (1: a plain process, no process group); returns
    [(returncode, output)] per rank and the wall time."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "TIERFLOW_DIST_TIMEOUT": "20", **(env_extra or {})}
    port = free_port()
    procs = []
    start = time.monotonic()
    for rank in range(world):
        rank_env = dict(env)
        if world > 1:
            rank_env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, WORKER, *map(str, args)], env=rank_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(f"a rank did not finish within {timeout_s} s")
        results.append((proc.returncode, out))
    return results, time.monotonic() - start


def run_ok(world: int, *args):
    results, _ = launch(world, *args)
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{out[-3000:]}"


U = 2.0 ** -24                 # fp32 unit roundoff
NORM_RTOL = 2e-6               # global norm, ranks vs one process (module docstring)
LR = 1e-2                      # dist_worker.py's AdamW
REF = ("--as-ranks", "2")      # one process: the ranks' micro-batches, accumulated
NO_CLIP = ("--clip", "1e9")    # clip_grad_norm_ that never engages: coefficient exactly 1


def assert_same(ref: dict, got: dict) -> None:
    """Same gradients and coefficient 1: equal bit for bit but for the reported norms."""
    assert got["losses"] == ref["losses"]
    assert got["norms"] == pytest.approx(ref["norms"], rel=NORM_RTOL, abs=0)
    assert ref["state"].keys() == got["state"].keys()
    for key in ref["state"]:
        torch.testing.assert_close(got["state"][key], ref["state"][key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")
    assert ref["moments"].keys() == got["moments"].keys()
    for key in ref["moments"]:
        torch.testing.assert_close(got["moments"][key], ref["moments"][key], rtol=0, atol=0,
                                   msg=lambda m: f"exp_avg_sq of {key}: {m}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with batch 4 (as the two ranks' micro-batches) and 2 ranks with batch 2
    each, host placement, each saving a checkpoint after 3 steps."""
    tmp = tmp_path_factory.mktemp("dist")
    run_ok(1, "--out", tmp / "one.pt", "--save", tmp / "ckpt-one", *REF, *NO_CLIP)
    run_ok(2, "--out", tmp / "two.pt", "--save", tmp / "ckpt-two", *NO_CLIP)
    return tmp


def test_two_ranks_equal_one_process_with_the_whole_batch_host(runs):
    one, two = torch.load(runs / "one.pt"), torch.load(runs / "two.pt")
    assert_same(one, two)
    # each rank keeps only its shard of the state (plus alignment padding of tiny units)
    assert two["placement"]["host"]["moments"] < one["placement"]["host"]["moments"]


def test_two_ranks_equal_one_process_with_the_whole_batch_nvme_tied_gpt2(tmp_path):
    # GPT-2 ties wte and lm_head: a unit used by two modules, gathered at each first hold.
    run_ok(1, "--out", tmp_path / "one.pt", "--arch", "gpt2", "--placement", "nvme", "--nvme", tmp_path / "nvme1",
           *REF, *NO_CLIP)
    run_ok(2, "--out", tmp_path / "two.pt", "--arch", "gpt2", "--placement", "nvme", "--nvme", tmp_path / "nvme2",
           *NO_CLIP)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert_same(one, two)
    assert set(two["placement"]["nvme"]) == {"master", "grads", "moments"}
    assert sorted(os.listdir(tmp_path / "nvme2")) == ["rank0", "rank1"]  # each rank its own directory


def test_sharded_checkpoint_is_complete_and_verified(runs):
    from tierflow.checkpoint import verify

    manifest = verify(runs / "ckpt-two")
    assert manifest["shards"]["world_size"] == 2
    parts = sorted(name for name in os.listdir(runs / "ckpt-two") if ".rank" in name)
    assert len(parts) == 6  # master, exp_avg, exp_avg_sq of each rank
    assert not [n for n in os.listdir(runs) if ".tmp-" in n]


def test_resume_at_another_world_size(runs):
    """2 -> 1 and 1 -> 2 continue like 1 -> 1 (same state, same next batches)."""
    run_ok(1, "--out", runs / "one-one.pt", "--resume", runs / "ckpt-one", *REF, *NO_CLIP)
    run_ok(1, "--out", runs / "two-one.pt", "--resume", runs / "ckpt-two", *REF, *NO_CLIP)
    run_ok(2, "--out", runs / "one-two.pt", "--resume", runs / "ckpt-one", *NO_CLIP)
    ref = torch.load(runs / "one-one.pt")
    assert_same(ref, torch.load(runs / "two-one.pt"))
    assert_same(ref, torch.load(runs / "one-two.pt"))


def test_clipping_over_ranks_equals_one_process(tmp_path):
    """Clipping that engages (max_norm 0.5, norms ~1.6): one AdamW step of tiny GPT-2 (whose key
    bias has a gradient that is rounding noise) within the bound of the module docstring."""
    run_ok(1, "--out", tmp_path / "one.pt", "--arch", "gpt2", "--steps", "1", *REF)
    run_ok(2, "--out", tmp_path / "two.pt", "--arch", "gpt2", "--steps", "1")
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["norms"][0] > 2 * 0.5  # max_norm 0.5: a coefficient < 1/2, clipping engages
    assert two["losses"] == one["losses"]  # the forward of step 1 precedes any clipping
    assert two["norms"] == pytest.approx(one["norms"], rel=NORM_RTOL, abs=0)
    d = NORM_RTOL + 2 * U  # relative difference of the clip coefficients (max_norm / (norm + 1e-6))
    for key in one["state"]:
        torch.testing.assert_close(two["state"][key], one["state"][key], rtol=2 * U, atol=LR * (d / 4 + 16 * U),
                                   msg=lambda m: f"{key}: {m}")
    for key in one["moments"]:  # (1 - beta2) * (c * g)**2: 2 d, plus three roundings in each run
        torch.testing.assert_close(two["moments"][key], one["moments"][key], rtol=2 * d + 6 * U, atol=0,
                                   msg=lambda m: f"exp_avg_sq of {key}: {m}")


def test_a_dead_rank_fails_the_others_with_a_clear_error(tmp_path):
    results, wall = launch(2, "--out", tmp_path / "x.pt", "--die-at-step", "1",
                           env_extra={"TIERFLOW_DIST_TIMEOUT": "10"})
    (code0, out0), (code1, _) = results
    assert code1 == 3
    assert code0 != 0
    assert "TierflowError: rank 0/2:" in out0 and "another rank has probably died" in out0, out0[-2000:]
    assert wall < 50


def test_plan_counts_one_rank_share_and_the_collective_traffic():
    from conftest import make_tiny

    from tierflow.config import OffloadConfig
    from tierflow.core.cost import class_bytes, collective_bytes
    from tierflow.core.layout import partition
    from tierflow.core.plan import plan_placement

    model = make_tiny("llama")
    cfg = OffloadConfig.create(host_memory="64MiB")
    totals = {}
    for world in (1, 4):
        units, _ = partition(model, 2**20, world_size=world)
        plan = plan_placement(units, cfg, torch.float32, 0, "host", world_size=world)
        table = class_bytes(units, plan, torch.float32, 0, world_size=world)
        totals[world] = table["host"]["master"] + table["host"]["moments"]
        moved = collective_bytes(units, torch.float32, world)
        weights = sum(4 * u.numel for u in units)
        assert moved == {"all_gather": 2 * (world - 1) * weights // world,
                         "reduce_scatter": (world - 1) * weights // world}
    assert totals[4] <= totals[1] / 4 + 3 * 4 * 2048 * 4  # a quarter, plus alignment padding
