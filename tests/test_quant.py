"""Compressed frozen weights (weights="int8" / "int4"): the formats' arithmetic, inference and
QLoRA-style LoRA training over a compressed base that streams from host memory or NVMe, bit
for bit against plain PyTorch / PEFT over the same dequantized weights held in memory (CPU),
the bytes moved, streaming load, the plan's accounting, and the errors before any work."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tierflow
from tierflow.core import quant
from tierflow.memory import packed
from tierflow.errors import ConfigError

from conftest import SMALL_UNITS, assert_bitwise, make_batches, make_tiny, torch_clip, train

FORMATS = ("int8", "int4")


def dequantized_copy(model, fmt, dtype=torch.float32):
    """The model with every frozen weight replaced by what the engine computes with."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for param in ref.parameters():
            if not param.requires_grad:
                param.data = packed.dequantized(param, fmt, dtype)
    return ref


# ---- the formats ------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantized_values_are_the_nearest_codes(fmt):
    torch.manual_seed(0)
    w = torch.randn(48, 64) * torch.linspace(0.01, 3, 48)[:, None]  # groups of very different scales
    w[3] = 0  # an all-zero group stays zero
    data = packed.quantize(w, fmt, torch.float32)
    assert data.dtype == torch.uint8 and data.numel() == quant.slot_bytes(w.numel(), w.shape, fmt, torch.float32)
    got = packed.dequantized(w, fmt, torch.float32)
    groups, deq = w.reshape(-1, quant.GROUP), got.reshape(-1, quant.GROUP)
    absmax = groups.abs().amax(1, keepdim=True).half().float()
    if fmt == "int8":  # within half a step of the group's scale (plus the fp16 rounding of the scale)
        step = (groups.abs().amax(1, keepdim=True) / 127).half().float()
        assert ((deq - groups).abs() <= step * 0.5 + step * 127 * 2**-11 + 1e-12).all()
    else:  # every value is an NF4 level times its group's absmax, the nearest one
        levels = torch.tensor(quant.NF4_LEVELS)
        candidates = levels[None, None, :] * absmax[:, :, None]
        best = (candidates - groups[:, :, None]).abs().min(dim=2).values
        assert torch.allclose((deq - groups).abs(), best, atol=1e-6)
    assert torch.equal(got[3], torch.zeros(64))
    assert (got - w).abs().max() < (0.03 if fmt == "int8" else 0.6) * w.abs().max()


def test_sizes_and_vectors_kept_exact():
    assert quant.slot_bytes(4096, (64, 64), "int8", torch.float32) == 4096 + 128
    assert quant.slot_bytes(4096, (64, 64), "int4", torch.float32) == 2048 + 128
    bias = torch.randn(100)  # vectors stay in the compute dtype, not grouped
    assert torch.equal(packed.dequantized(bias, "int4", torch.float32), bias)
    assert torch.equal(packed.dequantized(bias, "int8", torch.bfloat16), bias.bfloat16())


def test_chunked_dequantization_equals_one_pass(monkeypatch):
    w = torch.randn(256, 64)
    for fmt in FORMATS:
        whole = packed.dequantized(w, fmt, torch.float32)
        monkeypatch.setattr(packed, "CHUNK", 1024)
        assert torch.equal(packed.dequantized(w, fmt, torch.float32), whole)
        monkeypatch.undo()


def medium_llama():
    """Weights big enough that the 4 KiB alignment of each parameter costs little."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4)
    return transformers.LlamaForCausalLM(config).requires_grad_(False).eval()


# ---- inference ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("placement", ["device", "host", "nvme"])
def test_inference_bitwise_like_the_dequantized_model(fmt, placement, tmp_path, engines):
    model = make_tiny("llama").requires_grad_(False).eval()
    ref = dequantized_copy(model, fmt)
    engine = tierflow.offload(copy.deepcopy(model), nvme=tmp_path, placement=placement, weights=fmt, **SMALL_UNITS)
    engines.append(engine)
    ids = make_batches(1)[0]
    with torch.no_grad():
        want, got = ref(ids).logits, engine(ids).logits
    assert torch.equal(got, want)
    assert not torch.equal(got, model(ids).logits)  # (the compression did change the weights)
    assert all(state.home == placement and list(state.arrays) == ["qweights"] for state in engine.states)
    sd = engine.state_dict()  # read back dequantized, as the model computes with them
    assert all(torch.equal(sd[k], v) for k, v in ref.state_dict().items())


def test_bf16_compute_bitwise_like_the_dequantized_bf16_model(tmp_path, engines):
    model = make_tiny("llama").requires_grad_(False).eval()
    ref = dequantized_copy(model, "int8", torch.bfloat16)
    for p in ref.parameters():
        assert p.dtype == torch.bfloat16
    engine = tierflow.offload(copy.deepcopy(model), nvme=tmp_path, placement="nvme", weights="int8",
                              dtype=torch.bfloat16, **SMALL_UNITS)
    engines.append(engine)
    ids = make_batches(1)[0]
    with torch.no_grad():
        assert torch.equal(engine(ids).logits, ref(ids).logits)


def test_bytes_moved_per_forward_are_the_compressed_bytes(tmp_path, engines):
    """Each forward reads every NVMe-homed unit once: fp32 bytes without compression, the
    compressed array's bytes with it (3.9x / 7.5x fewer on weights, less on a model this small
    whose norms stay fp32 and whose parameters each start on a 4 KiB boundary)."""
    model = medium_llama()
    ids = torch.randint(0, 512, (1, 8))
    moved = {}
    for fmt in (None,) + FORMATS:
        engine = tierflow.offload(copy.deepcopy(model), nvme=tmp_path / str(fmt), placement="nvme", weights=fmt,
                                  device_memory="4MiB", unit_bytes="512KiB", chunk_bytes="256KiB",
                                  prefetch_bytes="64KiB")
        engines.append(engine)
        with torch.no_grad():
            engine(ids)
            before = engine.io_stats()
            engine(ids)
        after = engine.io_stats()
        moved[fmt] = after["nvme_read"] - before["nvme_read"]
        stored = sum(state.nbytes(name) for state in engine.states for name in state.arrays)
        # Every unit read once per forward, nothing else (a frozen uncompressed unit is read straight
        # into its buffer on a CPU, without the 4 KiB padding after its array: up to 4 KiB less).
        slack = 4096 * len(engine.states)
        assert stored - slack <= moved[fmt] <= stored, (fmt, moved[fmt], stored)
        assert stored - slack <= after["host_to_device"] - before["host_to_device"] <= stored
    assert moved[None] / moved["int8"] > 3.7 and moved[None] / moved["int4"] > 6.5, moved


@pytest.mark.parametrize("fmt", FORMATS)
def test_cpu_fetches_read_ahead_and_reuse_their_buffers(fmt, tmp_path, engines, monkeypatch):
    """On a CPU device, NVMe-homed compressed units are read whole, ahead of their fetch, into
    kept buffers, and dequantized into reused unit buffers: once warm, a forward allocates no
    fresh memory for them; the results stay those of the dequantized model; closing the
    engine gives the host memory of the reads back."""
    from tierflow.memory import tiers
    from tierflow.runtime import direct_fetch

    model = medium_llama()
    ref = dequantized_copy(model, fmt)
    engine = tierflow.offload(copy.deepcopy(model), nvme=tmp_path, placement="nvme", weights=fmt,
                              device_memory="4MiB", host_memory="64MiB", unit_bytes="512KiB", chunk_bytes="256KiB",
                              prefetch_bytes="1MiB")
    engines.append(engine)
    host = engine.budgets["host"]
    host_before = host.used
    fresh, ahead = [], []
    counting = lambda real: lambda *a, **k: fresh.append(a) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(packed, "aligned_flat", counting(tiers.aligned_flat))
    monkeypatch.setattr(direct_fetch, "aligned_flat", counting(tiers.aligned_flat))
    read_ahead = packed.PackedWeights.read_ahead
    monkeypatch.setattr(packed.PackedWeights, "read_ahead",
                        lambda self, state, uid: ahead.append(uid not in self.ahead) or read_ahead(self, state, uid))
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        want = ref(ids).logits
        counts = []
        for forward in range(6):
            fresh.clear()
            assert torch.equal(engine(ids).logits, want)
            counts.append(len(fresh))
    assert counts[-1] == 0 < counts[0], counts  # once warm (measured: 16, 8, 2, 0, ...): only kept buffers
    assert any(ahead)   # reads started before their fetch
    engine.close()
    assert host.used == host_before


@pytest.mark.parametrize("placement", ["host", "nvme"])
def test_staged_fetch_dequantizes_like_the_direct_one(placement, tmp_path, engines):
    """`fetch_into` (the GPU's fetch: staged reads, each parameter dequantized as it arrives),
    run on a CPU: every unit's buffer equals the dequantized weights."""
    model = medium_llama()
    engine = tierflow.offload(copy.deepcopy(model), nvme=tmp_path, placement=placement, weights="int4",
                              device_memory="4MiB", unit_bytes="512KiB", chunk_bytes="256KiB")
    engines.append(engine)
    want = dequantized_copy(model, "int4").state_dict()
    fetches = engine.passes.residency.packed
    for unit, state in zip(engine.units, engine.states):
        flat = torch.full((unit.numel,), float("nan"))
        assert fetches.fetch_into(state, unit, flat) == state.nbytes("qweights")
        for slot in unit.slots:
            assert torch.equal(flat[slot.offset:slot.offset + slot.numel].view(slot.shape), want[slot.name])


def test_one_openmp_thread_is_per_thread():
    """The dequantization's thread runs its torch ops alone; the other threads keep theirs."""
    import threading

    from tierflow.memory.device import one_openmp_thread

    if not torch.backends.openmp.is_available():
        pytest.skip("a torch build without OpenMP: no OpenMP team to narrow")
    before, seen = torch.get_num_threads(), {}
    torch.set_num_threads(2)  # (two, whatever the machine or OMP_NUM_THREADS: something to narrow)
    try:
        with one_openmp_thread(torch.device("cpu")):
            seen["inside"] = torch.get_num_threads()
            other = threading.Thread(target=lambda: seen.setdefault("other", torch.get_num_threads()))
            other.start()
            other.join()
        seen["after"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert seen == {"inside": 1, "other": 2, "after": 2}, seen


def test_load_streams_quantized_and_matches(tmp_path, engines):
    model = make_tiny("llama").eval()
    model.save_pretrained(tmp_path / "m")
    ref = dequantized_copy(model.requires_grad_(False), "int4")
    engine = tierflow.load(tmp_path / "m", trainable=False, weights="int4", nvme=tmp_path / "spill",
                           placement="nvme", **SMALL_UNITS)
    engines.append(engine)
    ids = make_batches(1)[0]
    with torch.no_grad():
        assert torch.equal(engine(ids).logits, ref(ids).logits)
    out = engine.generate(ids[:, :6], max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        want = ref.generate(ids[:, :6], max_new_tokens=4, do_sample=False)
    assert torch.equal(out, want)


# ---- QLoRA beyond memory -------------------------------------------------------------------------
LR = 1e-2


def lora_model():
    peft = pytest.importorskip("peft")  # (here, not at module level: only the QLoRA tests need it)
    torch.manual_seed(11)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return peft.get_peft_model(make_tiny("llama", 0), config)


@pytest.mark.parametrize("fmt,placement", [("int4", "nvme"), ("int8", "host")])
def test_qlora_trains_bitwise_like_plain_peft_over_dequantized_base(fmt, placement, tmp_path, engines):
    from tierflow.integrations.peft import adapter_state_dict

    batches = make_batches(6)
    ref = dequantized_copy(lora_model(), fmt)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=LR, fused=True)
    ref_losses, ref_norms = train(ref, ref_opt, torch_clip(ref), batches, 2)

    engine = tierflow.offload(lora_model(), nvme=tmp_path / "spill", placement=placement, weights=fmt,
                              **SMALL_UNITS)
    engines.append(engine)
    opt = tierflow.AdamW(engine, lr=LR)
    losses, norms = train(engine, opt, opt.clip_grad_norm_, batches, 2)
    compressed = [u for u in engine.units if u.weights]
    assert compressed and all(not s.trainable for u in compressed for s in u.slots)
    assert all(u.weights is None for u in engine.units if any(s.trainable for s in u.slots))
    assert_bitwise(ref_losses, losses, "losses")
    assert_bitwise(ref_norms, norms, "grad norms")
    got = adapter_state_dict(engine)
    assert got and all("lora_" in k for k in got)
    assert_bitwise([ref.state_dict()[k] for k in sorted(got)], [got[k] for k in sorted(got)], "adapters")
    start = lora_model().state_dict()
    assert all(not torch.equal(start[k], got[k]) for k in got if "lora_B" in k), "adapters must train"


# ---- the plan --------------------------------------------------------------------------------------
def test_plan_accounts_the_compressed_bytes():
    from tierflow.config import OffloadConfig
    from tierflow.core.planner import predict
    from test_plan import fake_calibration

    model = medium_llama()
    total = {}
    for fmt in (None, "int8", "int4"):
        cfg = OffloadConfig.create(weights=fmt, unit_bytes="512KiB", nvme="/tmp")
        pred = predict(model, cfg, fake_calibration(), placement="nvme")
        total[fmt] = sum(pred.table["nvme"].values())
    fp32 = sum(p.numel() * 4 for p in model.parameters())
    assert total[None] >= fp32
    assert total[None] > 3.7 * total["int8"] and total[None] > 6.5 * total["int4"], total


# ---- errors before any work --------------------------------------------------------------------------
def test_unknown_format_refused(tmp_path, spill_io):
    with pytest.raises(ConfigError, match="unknown weights format 'int3'.*int8, int4"):
        tierflow.offload(make_tiny("llama").requires_grad_(False), weights="int3", nvme=tmp_path, placement="nvme")
    assert spill_io == {"stores": 0, "writes": 0}  # refused before any spill file was opened


def test_format_on_trainable_model_refused_before_loading(tmp_path, spill_io):
    make_tiny("llama").save_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match="frozen parameters only.*trainable=False"):
        tierflow.load(tmp_path / "m", weights="int8", nvme=tmp_path / "spill", placement="nvme")
    assert spill_io == {"stores": 0, "writes": 0}


def test_ungroupable_shape_refused(tmp_path, spill_io):
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(3, 7)).requires_grad_(False)
    with pytest.raises(ConfigError, match=r"1.weight of shape \[7, 3\] has 21 elements.*group size 64"):
        tierflow.offload(model, weights="int4", nvme=tmp_path, placement="nvme")
    assert spill_io == {"stores": 0, "writes": 0}


def test_overwriting_compressed_weights_refused(engines):
    engine = tierflow.offload(make_tiny("llama").requires_grad_(False), weights="int8")
    engines.append(engine)
    unit, slot = next((u, s) for u, s in engine.named_slots() if u.weights and len(s.shape) == 2)
    with pytest.raises(ConfigError, match="stored compressed"):
        engine.write_array(unit, slot, "master", torch.zeros(slot.shape))


# ---- the command line ------------------------------------------------------------------------------
def test_cli_generate_and_plan_with_compressed_weights(tmp_path, capsys, monkeypatch):
    from tierflow.bench import calibrate
    from tierflow.cli.main import main
    from test_plan import fake_calibration

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # `tierflow plan` measures nothing
    calibrate.save(fake_calibration(), torch.float32)
    from tierflow.models import build_model

    model = build_model("llama-tiny").eval().requires_grad_(False)
    model.save_pretrained(tmp_path / "m")
    argv = ["generate", "--model", str(tmp_path / "m"), "--prompt", "def main(", "--max-new-tokens", "4",
            "--nvme", str(tmp_path / "gen"), "--device-memory", "1MiB", "--host-memory", "1MiB",
            "--tokenizer", "bytes"]
    assert main(argv + ["--weights", "int4"]) == 0
    printed = capsys.readouterr().out
    ref = dequantized_copy(model, "int4")
    ids = torch.tensor([list(b"def main(")])
    want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                        pad_token_id=258)[0, ids.shape[1]:].tolist()
    from tierflow.data import ByteTokenizer

    assert printed.startswith(ByteTokenizer().decode(want) + "\n"), printed  # the new text, streamed
    with pytest.raises(SystemExit):
        main(argv + ["--weights", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err

    assert main(["plan", "--model", "llama-tiny", "--weights", "int8", "--nvme", str(tmp_path), "--placement",
                 "nvme", "--json", str(tmp_path / "plan.json")]) == 0
    assert "frozen weights compressed as int8" in capsys.readouterr().out
    import json

    nvme = json.loads((tmp_path / "plan.json").read_text())["peak_bytes"]["nvme"]
    fp32 = sum(p.numel() * 4 for p in model.parameters())
    assert fp32 / 4 < nvme < fp32 / 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("placement", ["host", "nvme", "device"])
def test_cuda_dequantizes_on_the_gpu_like_the_cpu(fmt, placement, tmp_path, engines):
    """On a GPU the compressed bytes cross the link and are dequantized there: the same weights
    as on the CPU (the arithmetic is exact: int8 or an NF4 level, times an fp16 scale widened to
    fp32), so the logits equal the dequantized model's on the same GPU."""
    model = make_tiny("llama").requires_grad_(False).eval()
    ref = dequantized_copy(model, fmt).cuda()
    engine = tierflow.offload(copy.deepcopy(model), device="cuda", nvme=tmp_path, placement=placement,
                              weights=fmt, device_memory="1MiB" if placement != "device" else None, **SMALL_UNITS)
    engines.append(engine)
    ids = make_batches(1)[0].cuda()
    with torch.no_grad():
        assert torch.equal(engine(ids).logits, ref(ids).logits)
        assert torch.equal(engine(ids).logits, ref(ids).logits)  # (again: units fetched a second time)
    assert engine.io_stats()["host_to_device"] > 0
    sd = engine.state_dict()
    assert all(torch.equal(sd[k].cpu(), v.cpu()) for k, v in ref.state_dict().items())


def test_quality_bench_runs_its_baseline(tmp_path):
    """`tierflow bench quant --what quality` in miniature: uncompressed through tierflow gives
    the in-memory loss exactly; compressed losses are reported beside it."""
    from tierflow.bench.quant import run_quality

    rows, details = run_quality(tmp_path, steps=2, batch=2, seq_len=32, eval_batches=1, new_tokens=4, max_files=20)
    by_name = {r["name"]: r for r in rows}
    assert by_name["fp32 through tierflow: held-out loss (vs in memory)"]["ratio"] == 1.0
    for fmt in ("int8", "int4"):
        assert 0 <= by_name[f"{fmt}: teacher-forced top-1 agreement with fp32"]["tierflow"] <= 1
        assert by_name[f"{fmt}: held-out loss (vs fp32)"]["tierflow"] != details["losses"]["None"]
