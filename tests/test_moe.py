"""Mixture-of-experts models: loading from per-expert checkpoints (transformers' conversion rules),
experts fetched one by one as the router picks them, the expert cache, and training.

Mixtral and Qwen3-MoE are built from tiny configs with random weights and saved with
`save_pretrained` (which writes the per-expert form, `experts.N.w1.weight`)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import tierflow
from tierflow.checkpoint.files import CheckpointError
from tierflow.core.layout import is_routed, partition

from conftest import SMALL_UNITS, VOCAB, assert_bitwise, make_batches, torch_clip, train

NEW = 6


def moe_config(arch: str):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2)
    if arch == "mixtral":
        return transformers.MixtralConfig(intermediate_size=32, num_local_experts=8, **common)
    return transformers.Qwen3MoeConfig(moe_intermediate_size=32, intermediate_size=64, num_experts=8,
                                       head_dim=8, **common)


def make_moe(arch: str, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_config(moe_config(arch)).eval()


def save_quietly(model, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
    return path


def saved(tmp_path, arch):
    model = make_moe(arch)
    return save_quietly(model, tmp_path / f"hf-{arch}"), model


def prompts(batch=2, tokens=5, seed=0):
    return torch.randint(1, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids):
    return model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)


def load(path, tmp_path, engines, placement, **kwargs):
    options = dict(SMALL_UNITS, device_memory="400KiB", host_memory="640KiB", placement=placement,
                   nvme=tmp_path / "spill", trainable=False)
    options.update(kwargs)
    engine = tierflow.load(path, **options)
    engines.append(engine)
    return engine


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_checkpoint_holds_experts_one_by_one(tmp_path, arch):
    """The premise: save_pretrained writes per-expert tensors, the model holds fused ones."""
    path, model = saved(tmp_path, arch)
    from tierflow.checkpoint.files import TensorFileReader

    keys = TensorFileReader(path / "model.safetensors").keys()
    assert any(".experts.0." in k for k in keys) and not any(k.endswith("experts.gate_up_proj") for k in keys)
    assert any(n.endswith("experts.gate_up_proj") for n, _ in model.named_parameters())


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("placement", ["device", "host", "nvme", "auto"])
def test_greedy_output_equals_transformers(tmp_path, engines, arch, placement):
    path, model = saved(tmp_path, arch)
    ids = prompts()
    engine = load(path, tmp_path, engines, placement, **({"device_memory": "4MiB"} if placement == "device" else {}))
    assert torch.equal(engine.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0), greedy(model, ids))
    homes = {engine.plan.homes[u.uid] for u in engine.units if u.name.endswith(".experts")}
    assert placement == "auto" or homes == {placement}
    if "nvme" in homes:  # NVMe-homed experts are fetched one by one
        stats = engine.experts.stats()
        assert stats["requests"] > 0 and stats["bytes_read"] > 0
    else:  # device- or (on a CPU) host-homed experts stay attached, nothing is fetched
        assert engine.experts is None


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_loaded_state_equals_the_model(tmp_path, engines, arch):
    path, model = saved(tmp_path, arch)
    engine = load(path, tmp_path, engines, "nvme")
    got = engine.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(got[name], value), name


def test_decode_reads_only_the_routed_experts(tmp_path, engines):
    """Each decode step reads at most the experts its tokens were routed to (a cache hit reads
    nothing), and far less than all the NVMe-homed experts."""
    path, model = saved(tmp_path, "mixtral")
    engine = load(path, tmp_path, engines, "nvme")
    experts_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." in n)
    engine.generate(prompts(batch=1), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    stats = engine.experts.stats()
    (expert_bytes,) = {layer.expert_bytes for layer in engine.experts.layers}  # (4 KiB-aligned: read exactly)
    assert stats["bytes_read"] == (stats["misses"] + stats["prefetched"]) * expert_bytes, stats
    assert stats["bytes_read"] < stats["bytes_routed"]  # hits read nothing
    for step in engine.last_generation.decode_steps:
        assert step.nvme_read < engine.plan.tier_bytes["nvme"] - experts_bytes // 2, step.nvme_read
    assert stats["hits"] + stats["misses"] == stats["requests"]


def test_a_batch_shares_one_fetch_per_expert(tmp_path, engines):
    """Tokens of a batch routed to the same expert share its fetch: a layer call never asks for
    more experts than the layer has, whatever the batch."""
    path, _ = saved(tmp_path, "mixtral")
    engine = load(path, tmp_path, engines, "nvme")
    store = engine.experts
    calls = []
    original = store.take
    store.take = lambda layer, experts: calls.append(list(experts)) or original(layer, experts)
    engine.generate(prompts(batch=8), max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert calls and all(len(c) == len(set(c)) <= 8 for c in calls)
    assert max(len(c) for c in calls) > 2  # a batch of 8 routes to more than top-2 experts


def test_the_cache_keeps_hot_experts_within_its_slots(tmp_path, engines):
    path, model = saved(tmp_path, "mixtral")
    engine = load(path, tmp_path, engines, "nvme", device_memory="1MiB")
    store = engine.experts
    assert 0 < store.slots <= 8
    ids = prompts(batch=1)
    first = engine.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    before = dict(store.stats())
    again = engine.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    after = store.stats()
    assert torch.equal(first, again)
    assert after["hits"] > before["hits"], "the same prompt again must hit cached experts"
    assert all(len(layer.entries) <= store.slots for layer in store.layers)
    assert engine.budget_peaks()["device"][0] <= engine.budget_peaks()["device"][1]
    # misses are read straight into the stack buffer; the experts kept get memory of their own
    spare = store.spare.untyped_storage().data_ptr()
    kept = [(entry, t) for layer in store.layers for entry in layer.entries.values() for t in entry.tensors.values()]
    assert kept and all(not entry.borrowed and t.untyped_storage().data_ptr() != spare for entry, t in kept)
    # (in buffers of their own, which evicted experts hand on: no fresh memory per miss)
    assert all(t.untyped_storage().data_ptr() == entry.buffer.untyped_storage().data_ptr() for entry, t in kept)


def test_prediction_prefetches_next_layer_experts(tmp_path, engines):
    path, model = saved(tmp_path, "mixtral")
    engine = load(path, tmp_path, engines, "nvme")
    engine.experts.set_slots(2)  # a small cache, so that predictions find experts to fetch
    ids = prompts(batch=1)
    assert torch.equal(engine.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0), greedy(model, ids))
    stats = engine.experts.stats()
    assert all(len(layer.entries) <= 2 for layer in engine.experts.layers)
    assert all(layer.router_weight is not None for layer in engine.experts.layers[1:])
    assert stats["prefetched"] > 0 and 0 <= stats["prefetch_hits"] <= stats["prefetched"]


def test_routed_experts_are_units_of_their_own_without_fetch_hooks():
    model = make_moe("mixtral").requires_grad_(False)
    units, hooked = partition(model, 1 << 30)
    experts = [m for m in model.modules() if is_routed(m)]
    assert len(experts) == 2 and not set(experts) & set(hooked)
    for module in experts:
        owners = {u.uid for u in units for s in u.slots if any(s.param is p for p in module.parameters())}
        assert len(owners) == 1
        (unit,) = [u for u in units if u.uid in owners]
        assert len(unit.slots) == 2
    trainable = make_moe("mixtral")
    assert not any(is_routed(m) for m in trainable.modules())  # trainable experts stream whole


def test_wrong_expert_shape_fails_before_loading(tmp_path):
    path, _ = saved(tmp_path, "mixtral")
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 48
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"converted into model\.layers\.0\.mlp\.experts\.\w+.*expects"):
        tierflow.load(path, trainable=False)


def test_missing_expert_fails_before_loading(tmp_path):
    path, _ = saved(tmp_path, "mixtral")
    config = json.loads((path / "config.json").read_text())
    config["num_local_experts"] = 9
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="expects"):
        tierflow.load(path, trainable=False)


@pytest.mark.parametrize("placement", ["host", "nvme"])
def test_training_equals_torch_bitwise(tmp_path, engines, placement):
    """Trainable experts stream as whole units: the fused parameters' gradients (zero rows for
    experts no token picked) and AdamW steps are torch's, bitwise."""
    batches = make_batches(4, batch=2, seq=8)
    ref = make_moe("mixtral").train()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    ref_losses, ref_norms = train(ref, ref_opt, torch_clip(ref), batches, accum=2)
    model = make_moe("mixtral").train()
    engine = tierflow.offload(model, device_memory="400KiB", host_memory="4MiB" if placement == "host" else "640KiB",
                              nvme=tmp_path / "spill", placement=placement, **SMALL_UNITS)
    engines.append(engine)
    opt = tierflow.AdamW(engine, lr=1e-2, weight_decay=0.1, fused=True)
    losses, norms = train(engine, opt, opt.clip_grad_norm_, batches, accum=2)
    assert_bitwise(ref_losses, losses, "losses")
    assert_bitwise(ref_norms, norms, "grad norms")
    got = engine.state_dict()
    for name, value in ref.state_dict().items():
        assert torch.equal(got[name], value), name


def test_training_around_frozen_experts_equals_torch_bitwise(tmp_path, engines):
    """Frozen experts, the rest trained (as LoRA on attention would): the experts unit is held
    whole while autograd needs it, and everything is torch's, bitwise."""
    def frozen_experts(model):
        for name, module in model.named_modules():
            if name.endswith(".experts"):
                module.requires_grad_(False)
        return model

    batches = make_batches(4, batch=2, seq=8)
    ref = frozen_experts(make_moe("mixtral").train())
    assert sum(is_routed(m) for m in ref.modules()) == 2
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, fused=True)
    ref_losses, ref_norms = train(ref, ref_opt, torch_clip(ref), batches, accum=2)
    model = frozen_experts(make_moe("mixtral").train())
    engine = tierflow.offload(model, device_memory="400KiB", host_memory="640KiB", nvme=tmp_path / "spill",
                              placement="nvme", **SMALL_UNITS)
    engines.append(engine)
    assert engine.experts is not None
    opt = tierflow.AdamW(engine, lr=1e-2, fused=True)
    losses, norms = train(engine, opt, opt.clip_grad_norm_, batches, accum=2)
    assert_bitwise(ref_losses, losses, "losses")
    assert_bitwise(ref_norms, norms, "grad norms")
    got = engine.state_dict()
    for name, value in ref.state_dict().items():
        assert torch.equal(got[name], value), name
    with torch.no_grad():  # and inference of the trained model routes experts again
        ids = prompts(batch=1)
        assert torch.equal(engine.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0),
                           ref.eval().generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0))
    assert engine.experts.stats()["requests"] > 0


def test_offload_of_a_frozen_model_in_memory_routes_experts(tmp_path, engines):
    model = make_moe("qwen3_moe")
    ids = prompts()
    expected = greedy(model, ids)
    engine = tierflow.offload(model.requires_grad_(False), device_memory="400KiB", host_memory="640KiB",
                              nvme=tmp_path / "spill", placement="nvme", **SMALL_UNITS)
    engines.append(engine)
    assert torch.equal(engine.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0), expected)
    assert engine.experts.stats()["misses"] > 0


def test_frozen_experts_with_data_parallel_ranks_are_refused_before_any_state_moves(tmp_path, monkeypatch):
    """Said at planning time: the state used to be streamed into its tiers (threads started,
    parameters detached) before the refusal."""
    import types

    from tierflow.runtime import build, engine as runtime_engine

    model = make_moe("qwen3_moe").requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(runtime_engine.ranks, "detect", lambda: types.SimpleNamespace(world=2))
    monkeypatch.setattr(build, "load_state", lambda *a, **k: pytest.fail("state loaded before the check"))
    with pytest.raises(tierflow.ConfigError, match="data-parallel ranks.*one process"):
        tierflow.offload(model, nvme=tmp_path / "spill", placement="nvme", **SMALL_UNITS)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_bf16_experts_equal_transformers(tmp_path, engines):
    model = make_moe("mixtral").to(torch.bfloat16)
    path = save_quietly(model, tmp_path / "bf16")
    ids = prompts()
    engine = load(path, tmp_path, engines, "nvme")
    assert torch.equal(engine.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0), greedy(model, ids))
    assert engine.experts.stats()["bytes_read"] > 0


def test_moe_shape_predicts_routed_bytes_per_decode_step():
    from tierflow.core.moe import moe_shape

    model = make_moe("mixtral")
    shape = moe_shape(model, torch.float32)
    per_expert = 3 * 32 * 32 * 4  # gate, up and down rows of one expert, fp32
    assert (shape.layers, shape.experts, shape.top_k, shape.expert_bytes) == (2, 8, 2, per_expert)
    assert shape.total_bytes == 2 * 8 * per_expert
    assert shape.experts_per_step(1) == pytest.approx(2.0)
    assert 2.0 < shape.experts_per_step(4) < shape.experts_per_step(64) <= 8.0
    assert shape.routed_bytes(1) == pytest.approx(2 * 2 * per_expert)
    assert moe_shape(make_moe("qwen3_moe"), torch.bfloat16).expert_bytes == 3 * 32 * 32 * 2


def test_plan_reports_experts(tmp_path, monkeypatch, capsys):
    from test_plan import fake_calibration

    from tierflow.bench import calibrate
    from tierflow.cli.main import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calibrate.save(fake_calibration(), torch.float32)
    path, _ = saved(tmp_path, "mixtral")
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", str(path), "--device-memory", "1MiB", "--json", str(out)]) == 0
    experts = json.loads(out.read_text())["experts"]
    assert experts["experts"] == 8 and experts["top_k"] == 2
    assert experts["routed_bytes_per_decode_step"] == 2 * 2 * experts["expert_bytes"]
    assert "mixture of experts: 2 layers x 8 experts (top-2)" in capsys.readouterr().out
    # a budget that holds the frozen model's units but not their gradients: --frozen plans
    # what tierflow.load(..., trainable=False) holds
    assert main(["plan", "--model", str(path), "--device-memory", "240KiB", "--unit-bytes", "8KiB"]) == 1
    assert main(["plan", "--model", str(path), "--device-memory", "240KiB", "--unit-bytes", "8KiB", "--frozen",
                 "--json", str(out)]) == 0
    assert not any(tier["grads"] or tier["moments"] for tier in json.loads(out.read_text())["placement"]["bytes"].values())


def test_cache_slots_bad_value(tmp_path, engines):
    path, _ = saved(tmp_path, "mixtral")
    engine = load(path, tmp_path, engines, "nvme")
    with pytest.raises(tierflow.ConfigError, match="slots"):
        engine.experts.set_slots(-1)


def test_overwritten_experts_are_not_served_from_the_cache(tmp_path, engines):
    """engine.write_array (as resume does) drops the unit's cached experts."""
    path, model = saved(tmp_path, "mixtral")
    engine = load(path, tmp_path, engines, "nvme", device_memory="1MiB")
    ids = prompts(batch=1)
    engine.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert any(layer.entries for layer in engine.experts.layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".experts." in name:
                param.mul_(-1.5)
    slots = {id(s.param): (u, s) for u, s in engine.named_slots()}
    for name, param in engine.module.named_parameters():
        if ".experts." in name:
            engine.write_array(*slots[id(param)], "master", dict(model.named_parameters())[name].detach())
    assert not any(layer.entries for layer in engine.experts.layers)
    assert torch.equal(engine.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0), greedy(model, ids))


def test_experts_whose_rows_are_not_4k_aligned(tmp_path, engines):
    """Experts of 3,840 and 1,920 bytes: NVMe reads are widened to the O_DIRECT alignment, and
    only the expert's own elements are used."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=20, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                        num_experts_per_tok=2, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    path = save_quietly(model, tmp_path / "odd")
    ids = prompts()
    engine = load(path, tmp_path, engines, "nvme")
    assert torch.equal(engine.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0), greedy(model, ids))
    stats = engine.experts.stats()
    reads = stats["misses"] + stats["prefetched"]  # one read per fused parameter of each: >= 4 KiB each
    assert stats["misses"] > 0 and stats["bytes_read"] >= reads * 2 * 4096 > reads * 3 * 24 * 20 * 4


def test_load_and_generate_peak_rss_stays_near_the_budgets(tmp_path):
    """A ~210 MB Mixtral, 8x the 24 MiB budgets, from per-expert tensors: loading converts one
    fused parameter at a time, so the process grows by about the budgets plus a fixed overhead
    (the conversion of one fused parameter, staging, experts read ahead, allocator slack:
    measured 54-63 MiB in all with 32 layers), not by the model."""
    import subprocess
    import sys
    from pathlib import Path

    import transformers
    from test_generate import _RSS_CHILD

    config = transformers.MixtralConfig(vocab_size=512, hidden_size=256, intermediate_size=192, num_hidden_layers=40,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                        num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.MixtralForCausalLM(config)
        model.save_pretrained(tmp_path / "hf", max_shard_size="50MB")
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    del model
    env = dict(PYTHONPATH=str(Path(tierflow.__file__).parent.parent), PATH="/usr/bin:/bin",
               XDG_CACHE_HOME=str(tmp_path / "cache"))  # (nominal figures: not this machine's calibration)
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(tmp_path / "hf"), str(tmp_path / "spill")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    growth = figures["peak"] - figures["base"]
    assert figures["nvme"] > model_bytes / 2
    assert model_bytes > 8 * 24 * 2**20
    assert growth < (24 + 56) * 2**20 and growth < model_bytes / 2.5, \
        f"peak RSS grew by {growth / 2**20:.1f} MiB for a {model_bytes / 2**20:.0f} MiB model: {figures}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("placement", ["host", "nvme"])
def test_cuda_routed_experts_equal_transformers(tmp_path, engines, arch, placement):
    """On a GPU, host- and NVMe-homed experts are routed (copy lane, staging buffers, router
    copies and predictions on the device): the same tokens as transformers on the GPU."""
    path, model = saved(tmp_path, arch)
    ids = prompts(batch=3).cuda()
    expected = greedy(model.cuda(), ids)
    engine = load(path, tmp_path, engines, placement, device="cuda")
    engine.experts.set_slots(2)
    for _ in range(2):  # the second time with cached experts and predictions
        assert torch.equal(engine.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0), expected)
    stats = engine.experts.stats()
    assert stats["misses"] > 0 and stats["hits"] > 0 and stats["bytes_read"] > 0


def test_compressed_experts_stream_whole_and_equal_the_dequantized_model(tmp_path, engines):
    """weights="int8" on a mixture of experts: compressed units are read and dequantized whole,
    so its experts are not routed one by one, and the output is the dequantized model's."""
    from test_quant import dequantized_copy

    path, model = saved(tmp_path, "mixtral")
    ref = dequantized_copy(model.requires_grad_(False), "int8")
    engine = load(path, tmp_path, engines, "nvme", weights="int8")
    assert engine.experts is None
    ids = prompts()
    assert torch.equal(greedy(engine, ids), greedy(ref, ids))


def test_bench_moe_runs_both_contenders_on_the_same_model(tmp_path):
    """`tierflow bench moe` on a tiny Mixtral: tierflow and accelerate's disk offload each in
    their own process, same greedy tokens, routed bytes counted."""
    from tierflow.bench.moe import run_moe_bench

    rows = {r["name"]: r for r in run_moe_bench(tmp_path, hidden=64, layers=2, intermediate=64, experts=4, top_k=2,
                                                 vocab=256, device_memory="512KiB", host_memory="1MiB", limit="1GiB",
                                                 prompt=6, new_tokens=3, threads=1)}
    assert rows["same greedy tokens"]["tierflow"] == 1
    assert rows["tokens/s (vs accelerate disk offload)"]["reference"] > 0
    read = rows["expert bytes read / routed per decode step"]
    assert 0 < read["tierflow"] <= read["reference"]  # (a cache hit reads nothing)
