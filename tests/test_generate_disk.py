"""Generation at the disk's speed (CPU compute device): NVMe-homed weights are read straight
into aligned buffers on the NVMe threads (no transfer thread, no staging copy), the buffers of
one step serve the next, and the greedy tokens stay those of transformers. Also the pieces of
`tierflow bench generate --matrix` that do arithmetic."""
from __future__ import annotations

import subprocess
import time
import warnings

import pytest
import torch

import tierflow
from tierflow.bench import isolated
from tierflow.bench.generate import forward_seconds_at_least
from tierflow.bench.generate_matrix import cell_summary, layers_for, meets_targets
from tierflow.cli.bench import parse_budgets
from tierflow.errors import ConfigError
from tierflow.memory.nvme import NvmeStore
from tierflow.memory.tiers import StateIO, UnitState, aligned_flat, takes_direct_reads
from tierflow.runtime import direct_fetch as fetch_module

from conftest import SMALL_UNITS, VOCAB, make_tiny

NEW = 6


def saved_llama(tmp_path):
    model = make_tiny("llama").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model


def greedy(model_or_engine, ids):
    return model_or_engine.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)


def test_nvme_units_are_read_straight_into_their_buffers(tmp_path, engines, monkeypatch):
    path, model = saved_llama(tmp_path)
    engine = tierflow.load(path, nvme=tmp_path / "spill", placement="nvme", trainable=False,
                           device_memory="160KiB", **SMALL_UNITS)
    engines.append(engine)
    calls = {"direct": 0, "staged": 0}
    direct, staged = StateIO.read_whole_async, StateIO.read_into

    def count_direct(self, *args):
        calls["direct"] += 1
        return direct(self, *args)

    def count_staged(self, *args):
        calls["staged"] += 1
        return staged(self, *args)

    monkeypatch.setattr(StateIO, "read_whole_async", count_direct)
    monkeypatch.setattr(StateIO, "read_into", count_staged)
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy(engine, ids), greedy(model, ids))
    fetched = sum(1 for home in engine.plan.homes if home == "nvme")
    assert calls["staged"] == 0 and calls["direct"] >= fetched > 0, calls
    assert all(step.nvme_read > 0 for step in engine.last_generation.steps)  # the budget keeps few units
    for uid, home in enumerate(engine.plan.homes):
        flat = engine.residency[uid].flat
        if home == "nvme" and flat is not None:
            assert takes_direct_reads(flat)


def test_buffers_are_reused_and_the_device_budget_does_not_creep(tmp_path, engines, monkeypatch):
    path, model = saved_llama(tmp_path)
    engine = tierflow.load(path, nvme=tmp_path / "spill", placement="nvme", trainable=False,
                           device_memory="160KiB", **SMALL_UNITS)
    engines.append(engine)
    ids = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(1))
    expected = greedy(model, ids)
    assert torch.equal(greedy(engine, ids), expected)
    used = engine.budgets["device"].used
    fresh = []
    allocate = fetch_module.aligned_flat
    monkeypatch.setattr(fetch_module, "aligned_flat", lambda *a: fresh.append(a) or allocate(*a))
    for _ in range(2):
        assert torch.equal(greedy(engine, ids), expected)
        assert engine.budgets["device"].used == used  # buffers changed hands, bytes stayed accounted
    fetches = 2 * (NEW + 1) * sum(1 for home in engine.plan.homes if home == "nvme")
    # Units repeat their sizes layer after layer: most fetches take the buffer of a unit of
    # the same size used longer ago (the first ones of a call may find none free yet).
    assert len(fresh) < fetches / 2, (len(fresh), fetches)


def test_read_whole_async_reads_every_byte_and_refuses_other_targets(tmp_path):
    with NvmeStore(tmp_path, io_threads=2, chunk_bytes=16384) as store:
        numel = 10_000  # 40,000 bytes: several requests, and a tail rounded up to 4 KiB
        extent = store.allocate(numel * 4)
        data = torch.randn(numel, generator=torch.Generator().manual_seed(2))
        staged = aligned_flat(numel, torch.float32)
        staged.copy_(data)
        store.write(extent, torch.empty(0, dtype=torch.uint8).set_(staged.untyped_storage(),
                                                                   staged.storage_offset() * 4, (40960,)))
        io = StateIO(None, {}, store, None)
        state = UnitState("nvme", {"weights": extent}, {"weights": torch.float32})
        assert io.reads_whole(state, "weights", torch.float32)
        assert not io.reads_whole(state, "weights", torch.bfloat16)  # a conversion goes the staged way
        dst = aligned_flat(numel, torch.float32)
        io.read_whole_async(state, "weights", dst).result()
        assert torch.equal(dst, data)
        misaligned = torch.empty(numel + 1)[1:]
        assert not takes_direct_reads(misaligned)
        with pytest.raises(ValueError, match="aligned_flat"):
            io.read_whole_async(state, "weights", misaligned)
        with pytest.raises(ValueError, match="aligned_flat"):  # bigger than the array
            io.read_whole_async(state, "weights", aligned_flat(2 * numel, torch.float32))


def test_matrix_model_sizes_and_budget_pairs():
    limit = 768 * 2**20
    for factor in (2, 4, 8):
        layers = layers_for(factor, limit, 1024, 2816, 8000)
        size = 4 * (layers * (4 * 1024**2 + 3 * 1024 * 2816 + 2 * 1024) + 2 * 8000 * 1024 + 1024)
        assert abs(size - factor * limit) <= 4 * (4 * 1024**2 + 3 * 1024 * 2816)  # within a layer
    assert parse_budgets(["48MiB/96MiB", "1GiB/2GiB"]) == (("48MiB", "96MiB"), ("1GiB", "2GiB"))
    for bad in ("48MiB", "48MiB/", "a/b/c"):
        with pytest.raises(ConfigError, match="DEVICE/HOST"):
            parse_budgets([bad])


def test_matrix_cell_summary_computes_the_bound_and_the_speedup():
    runs = {"tierflow": dict(steps=[2.0, 1.0, 1.2, 1.1], nvme_read=[0, 2e9, 2e9, 2e9], tokens=[[5, 6, 7]]),
            "accelerate": dict(steps=[5.0, 4.0, 4.0, 4.0], tokens=[[5, 6, 7]]),
            "memory": dict(steps=[1.0, 0.5, 0.4, 0.6], tokens=[[5, 6, 7]])}
    cell = cell_summary(2, 3e9, "48MiB", "96MiB", 1, runs, 2.0, 4)
    assert cell["step_s"] == 1.1 and cell["io_s"] == 1.0 and cell["compute_s"] == 0.4 and cell["bound_s"] == 1.0
    assert cell["step_over_bound"] == pytest.approx(1.1)
    assert cell["speedup"] == pytest.approx(17 / 5.3) and cell["same_tokens"]
    assert meets_targets(cell)
    runs["accelerate"]["tokens"] = [[5, 6, 8]]
    assert not meets_targets(cell_summary(2, 3e9, "48MiB", "96MiB", 1, runs, 2.0, 4))
    failed = cell_summary(2, 3e9, "48MiB", "96MiB", 1, dict(runs, tierflow={"error": "killed"}), 2.0, 4)
    assert failed["tierflow_error"] == "killed" and not meets_targets(failed)


def test_matrix_bound_takes_the_disk_measured_around_the_run():
    runs = {"tierflow": dict(steps=[2.0, 1.0, 1.2, 1.1], nvme_read=[0, 2e9, 2e9, 2e9], tokens=[[5, 6, 7]],
                             disk_around=[1.5, 2.5]),
            "accelerate": dict(steps=[5.0, 4.0, 4.0, 4.0], tokens=[[5, 6, 7]]),
            "memory": dict(steps=[1.0, 0.5, 0.4, 0.6], tokens=[[5, 6, 7]])}
    cell = cell_summary(2, 3e9, "48MiB", "96MiB", 1, runs, 4.0, 4)
    assert cell["disk_gbps"] == 2.0 and cell["io_s"] == 1.0 and cell["step_over_bound"] == pytest.approx(1.1)
    assert cell["step_over_run_best_bound"] == pytest.approx(1.1 / 0.5)  # 2 GB at the start's 4 GB/s


def test_matrix_accelerate_timing_out_gives_a_lower_bound_of_the_ratio():
    """Killed at its time-out, accelerate's forwards took at least the completed ones plus the one
    under way at the kill (tokens/s counts forward time, not loading): that bounds its tokens/s."""
    # loaded until t=1000; the prefill took 40 s; the first decode forward ran 30 s until the kill
    progress = [("forward", 1000.0), ("done", 1040.0), ("forward", 1041.0)]
    runs = {"tierflow": dict(steps=[2.0, 1.0, 1.2, 1.1], nvme_read=[0, 2e9, 2e9, 2e9], tokens=[[5, 6, 7]]),
            "accelerate": {"error": "did not finish within 600 s", "timed_out": 600.0, "killed_at": 1071.0,
                           "progress": progress},
            "memory": dict(steps=[1.0, 0.5, 0.4, 0.6], tokens=[[5, 6, 7]])}
    cell = cell_summary(2, 3e9, "48MiB", "96MiB", 1, runs, 2.0, 4)
    assert cell["accelerate_tps_below"] == pytest.approx(4 / 70) and cell["speedup_above"] == pytest.approx(70 / 5.3)
    assert cell["same_tokens"] and meets_targets(cell)
    runs["memory"]["tokens"] = [[5, 6, 8]]  # tierflow's tokens are still checked, against the model in memory
    assert not meets_targets(cell_summary(2, 3e9, "48MiB", "96MiB", 1, runs, 2.0, 4))
    runs["memory"]["tokens"] = [[5, 6, 7]]
    runs["accelerate"]["progress"] = []  # killed while loading: no bound at all, no ratio
    loading = cell_summary(2, 3e9, "48MiB", "96MiB", 1, runs, 2.0, 4)
    assert "speedup_above" not in loading and not meets_targets(loading)
    runs["accelerate"] = {"error": "exit status -9 (killed: out of memory under the cgroup limit)"}
    assert not meets_targets(cell_summary(2, 3e9, "48MiB", "96MiB", 1, runs, 2.0, 4))


def test_a_killed_contender_reports_the_progress_it_made(monkeypatch):
    """The PROGRESS lines a child printed before its time-out reach the parent, with the kill's
    time (launch_in_cgroup reads the partial output the time-out leaves)."""
    code = ("import time\nfrom tierflow.bench.isolated import print_progress\n"
            "print_progress('forward'); print_progress('done'); print_progress('forward'); time.sleep(60)\n")
    real_run = subprocess.run
    monkeypatch.setattr(isolated.subprocess, "run", lambda cmd, **kwargs: real_run([cmd[0], "-c", code], **kwargs))
    start = time.time()
    run = isolated.launch_in_cgroup("unused", "unused", {}, None, timeout=4)
    assert run["timed_out"] == 4 and [what for what, _ in run["progress"]] == ["forward", "done", "forward"]
    assert start <= run["progress"][-1][1] <= run["killed_at"]
    assert 0 < forward_seconds_at_least(run) <= run["killed_at"] - start


def test_read_ranges_into_reads_aligned_ranges_in_place_and_copies_the_others(tmp_path, monkeypatch):
    """MoE experts' rows: an aligned range is read straight into its target (no fresh buffer),
    an unaligned one through a widened aligned read, then copied; both exact."""
    from tierflow.memory import tiers
    from tierflow.memory.device import ComputeDevice

    with NvmeStore(tmp_path, io_threads=2, chunk_bytes=16384) as store:
        numel = 8192
        extent = store.allocate(numel * 4)
        data = torch.randn(numel, generator=torch.Generator().manual_seed(3))
        staged = aligned_flat(numel, torch.float32)
        staged.copy_(data)
        store.write(extent, staged.view(torch.uint8))
        io = StateIO(ComputeDevice(torch.device("cpu")), {}, store, None)
        state = UnitState("nvme", {"weights": extent}, {"weights": torch.float32})
        fresh = []
        allocate = tiers.aligned_empty
        target = aligned_flat(4096, torch.float32)
        monkeypatch.setattr(tiers, "aligned_empty", lambda n, *a: fresh.append(n) or allocate(n, *a))
        ranges = [(1024, 2048), (3072, 1024), (5000, 100)]  # two 4 KiB-aligned, one not
        into = [target[:2048], target[2048:3072], torch.empty(100)]
        out, nbytes = io.read_ranges(state, "weights", ranges, into)
        for (start, count), got, dst in zip(ranges, out, into):
            assert got is dst and torch.equal(got, data[start:start + count])
        assert fresh == [4096]  # only the unaligned range took a buffer (its widened span: 4 KiB)
        assert nbytes == (2048 + 1024) * 4 + 4096
        plain, _ = io.read_ranges(state, "weights", ranges)
        assert all(torch.equal(a, b) for a, b in zip(plain, out))


def test_frozen_units_read_direct_train_bitwise_when_fetched_again_for_backward(tmp_path, engines, monkeypatch):
    """A frozen NVMe unit (a LoRA base, frozen experts) is read straight into an aligned
    buffer; autograd's saved views of it are fetched again for backward, into a buffer that
    may start elsewhere in its storage (each direct read here starts 0, 4 or 8 KiB in): the
    gradients stay torch's, bitwise."""
    from conftest import assert_bitwise, make_batches, torch_clip, train

    shifts = iter(range(10**6))

    def shifted(numel, dtype):
        pad = 1024 * (next(shifts) % 3)
        return aligned_flat(numel + pad, dtype)[pad:]

    def frozen_base(model):
        for name, module in model.named_modules():
            if name.endswith(("self_attn", "mlp")):
                module.requires_grad_(False)
        return model.train()

    monkeypatch.setattr(fetch_module, "aligned_flat", shifted)
    batches = make_batches(4, batch=2, seq=8)
    ref = frozen_base(make_tiny("llama"))
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, fused=True)
    ref_losses, ref_norms = train(ref, ref_opt, torch_clip(ref), batches, accum=1)
    engine = tierflow.offload(frozen_base(make_tiny("llama")), device_memory="160KiB", host_memory="640KiB",
                              nvme=tmp_path / "spill", placement="nvme", **SMALL_UNITS)
    engines.append(engine)
    opt = tierflow.AdamW(engine, lr=1e-2, fused=True)
    losses, norms = train(engine, opt, opt.clip_grad_norm_, batches, accum=1)
    frozen = sum(home == "nvme" and not unit.trainable_numel for unit, home in zip(engine.units, engine.plan.homes))
    assert frozen and next(shifts) > frozen  # some fetched again (for backward, the next step)
    assert_bitwise(ref_losses, losses, "losses")
    assert_bitwise(ref_norms, norms, "grad norms")
    got = engine.state_dict()
    for name, value in ref.state_dict().items():
        assert torch.equal(got[name], value), name


def test_the_compute_load_of_the_disk_reference_runs_only_inside_its_block(monkeypatch):
    import subprocess

    from tierflow.bench import generate as bench

    children = []
    real_popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: children.append(real_popen(*a, **k)) or children[-1])
    with bench._compute_load(0):
        pass
    assert children == []  # none asked for: nothing started
    with bench._compute_load(1):
        assert len(children) == 1 and children[0].poll() is None  # computing while fio would run
    assert children[0].poll() is not None  # and gone after


def test_matrix_refuses_flags_it_would_not_take():
    from tierflow.cli.bench import run
    from tierflow.cli.main import build_parser

    args = build_parser().parse_args(["bench", "generate", "--matrix", "--device", "cuda", "--layers", "3"])
    with pytest.raises(ConfigError, match="--layers, --device not taken with --matrix"):
        run(args)
