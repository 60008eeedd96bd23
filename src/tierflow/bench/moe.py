"""``tierflow bench moe``: generation with a mixture-of-experts model bigger than memory, tierflow
(experts fetched one by one as the router picks them) against accelerate's disk offload, on the
same model, prompts, budgets and memory limit.

1. A Mixtral with random weights is built from a config (default ~2.4 GB in fp32, 4.7x the
   budgets) and saved with `save_pretrained` (per-expert tensors, as real checkpoints).
2. Each contender runs in its own process inside the memory cgroup of `bench generate`
   (page cache counted; root only), after the page cache is dropped:
   - tierflow: `tierflow.load(trainable=False)` with device/host budgets and an NVMe spill
     directory, then `engine.generate`;
   - accelerate: `from_pretrained(device_map="auto", max_memory={"cpu": device + host budget},
     offload_folder=...)`, then `generate`.
3. Printed: tokens/s of both and the ratio; per decode step, the expert bytes tierflow read
   against the bytes of the experts its tokens were routed to (a cache hit reads nothing) and
   against all the experts (what a whole-layer fetch reads); the expert cache's hit rate; whether
   the greedy tokens are the same.
"""
from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

from tierflow.bench.generate import make_cgroup, reset_cgroup
from tierflow.bench.io import drop_caches
from tierflow.bench.isolated import launch_in_cgroup
from tierflow.bench.model_dirs import parameter_bytes, saved_random_model
from tierflow.bench.report import print_row, row, write_json

MiB = 2**20


def model_config(hidden: int, layers: int, intermediate: int, experts: int, top_k: int, vocab: int):
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=max(2, hidden // 128), num_key_value_heads=2,
                         num_local_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def build_model_dir(directory: Path, config) -> dict:
    """Save a random Mixtral with `config` (kept when `directory` already holds it); returns its
    parameter bytes in all and of the experts."""
    return saved_random_model(directory, config, lambda model: {"all": parameter_bytes(model),
                                                                 "experts": parameter_bytes(model, ".experts.")})


def _child(spec: dict) -> dict:
    """Runs in the contender's process (already inside the cgroup)."""
    import torch

    torch.set_num_threads(spec["threads"])
    ids = torch.randint(3, spec["vocab"], (spec["batch"], spec["prompt"]), generator=torch.Generator().manual_seed(1))
    ids = ids.to(spec.get("device", "cpu"))  # (the same tokens on either device)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=spec["new_tokens"], do_sample=False,
                  pad_token_id=0)
    start = time.perf_counter()
    result = {}
    if spec["contender"] == "tierflow":
        import tierflow

        engine = tierflow.load(spec["model"], device=spec.get("device", "cpu"), device_memory=spec["device_memory"],
                               host_memory=spec["host_memory"],
                               nvme=spec["nvme"], trainable=False)
        loaded = time.perf_counter() - start
        store, per_step = engine.experts, []
        if store is not None:  # the expert counters after each forward (= each generation step)
            engine.module.register_forward_hook(lambda m, a, o: per_step.append(store.stats()))
        out = engine.generate(ids, **kwargs)
        steps = [s.seconds for s in engine.last_generation.steps]
        result.update(nvme_read=[s.nvme_read for s in engine.last_generation.steps], expert_steps=per_step,
                      placement={tier: sum(v.values()) for tier, v in engine.placement().items()})
        engine.close()
    else:
        from transformers import AutoModelForCausalLM

        offload = Path(spec["nvme"]) / "accelerate-offload"
        offload.mkdir(parents=True, exist_ok=True)
        on_gpu = spec.get("device", "cpu") != "cpu"
        budgets = ({0: spec["device_memory"], "cpu": spec["host_memory"]} if on_gpu
                   else {"cpu": spec["device_memory"] + spec["host_memory"]})
        model = AutoModelForCausalLM.from_pretrained(
            spec["model"], dtype=torch.float32, device_map="auto", offload_folder=str(offload),
            max_memory=budgets).eval()
        loaded = time.perf_counter() - start
        steps = []
        sync = torch.cuda.synchronize if on_gpu else (lambda: None)
        model.register_forward_pre_hook(lambda m, a: sync() or steps.append(-time.perf_counter()))
        model.register_forward_hook(lambda m, a, o: sync() or steps.__setitem__(-1, steps[-1] + time.perf_counter()))
        out = model.generate(ids, **kwargs)
    result.update(steps=steps, load_s=loaded, tokens=out[:, spec["prompt"]:].tolist())
    return result


def run_contender(spec: dict, cgroup: Path | None, timeout: float) -> dict:
    drop_caches()
    reset_cgroup(cgroup)
    group = str(cgroup / "cgroup.procs") if cgroup is not None else None
    return launch_in_cgroup("tierflow.bench.moe", "_main", spec, group, timeout)


def run_moe_bench(directory, hidden=1024, layers=16, intermediate=1408, experts=8, top_k=2, vocab=8000,
                  device_memory="384MiB", host_memory="128MiB", limit=None, batch=1, prompt=16, new_tokens=8,
                  threads=2, json_path=None, timeout=1800.0, device="cpu") -> list[dict]:
    from tierflow.config import format_size, parse_size

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    model_dir, spill = directory / "model", directory / "spill"
    sizes = build_model_dir(model_dir, model_config(hidden, layers, intermediate, experts, top_k, vocab))
    device_b, host_b = parse_size(device_memory), parse_size(host_memory)
    limit_b = parse_size(limit) if limit else device_b + host_b + 640 * MiB
    print(f"model: {format_size(sizes['all'])} ({format_size(sizes['experts'])} of experts, {experts} per layer, "
          f"top-{top_k}), {sizes['all'] / (device_b + host_b):.1f}x the budgets ({format_size(device_b)} device, "
          f"{format_size(host_b)} host), {sizes['all'] / limit_b:.1f}x the memory limit of {format_size(limit_b)}",
          flush=True)
    cgroup = make_cgroup(limit_b)
    base = dict(model=str(model_dir), vocab=vocab, batch=batch, prompt=prompt, new_tokens=new_tokens,
                threads=threads, device_memory=device_b, host_memory=host_b, nvme=str(spill), device=device)
    runs = {}
    for contender in ("tierflow", "accelerate"):
        shutil.rmtree(spill / "accelerate-offload", ignore_errors=True)
        print(f"running {contender} ...", flush=True)
        runs[contender] = run_contender(dict(base, contender=contender), cgroup, timeout)
        if "error" in runs[contender]:
            print(f"  {contender} failed: {runs[contender]['error']}", flush=True)
    rows = _rows(runs, sizes, layers, experts, batch, new_tokens)
    for r in rows:
        print_row(r)
    for name, run in runs.items():
        if "steps" in run:
            print(f"{name}: load {run['load_s']:.1f} s, prefill {run['steps'][0]:.2f} s, decode step median "
                  f"{statistics.median(run['steps'][1:]):.3f} s" + (f", placement {json.dumps(run['placement'])}"
                                                                     if "placement" in run else ""))
    write_json(rows + [{"name": "details", "sizes": sizes, "limit": limit_b, "cgroup": cgroup is not None,
                        "runs": runs}], json_path)
    if cgroup is not None:
        try:
            cgroup.rmdir()
        except OSError:
            pass
    return rows


def _rows(runs: dict, sizes: dict, layers: int, experts: int, batch: int, new_tokens: int) -> list[dict]:
    tf, acc = runs["tierflow"], runs["accelerate"]
    tps = lambda run: batch * new_tokens / sum(run["steps"]) if "steps" in run else None  # noqa: E731
    rows = [row("tokens/s (vs accelerate disk offload)", tps(tf), tps(acc), "tokens/s")] if "steps" in tf else []
    per_step = tf.get("expert_steps") or []
    if len(per_step) > 1:
        deltas = [{k: b[k] - a[k] for k in ("bytes_read", "bytes_routed", "hits", "requests")}
                  for a, b in zip(per_step, per_step[1:])]  # decode steps only (the first is the prefill)
        read = statistics.median(d["bytes_read"] for d in deltas)
        routed = statistics.median(d["bytes_routed"] for d in deltas)
        rows.append(row("expert bytes read / routed per decode step", read, routed, "bytes (ratio: goal <= 1.2)"))
        rows.append(row("expert bytes read / all experts per decode step", read, sizes["experts"],
                        "bytes (what whole-layer fetches read)"))
        rows.append(row("NVMe bytes read per decode step (all units)", statistics.median(tf["nvme_read"][1:]),
                        sizes["all"], "bytes (ratio: share of the model)"))
        hits, requests = sum(d["hits"] for d in deltas), sum(d["requests"] for d in deltas)
        rows.append(row("expert cache hit rate (decode)", hits / max(requests, 1), 1.0,
                        f"hits/uses, {per_step[-1]['slots']} of {experts} experts cached per layer"))
    if "tokens" in tf and "tokens" in acc:
        rows.append(row("same greedy tokens", float(tf["tokens"] == acc["tokens"]), 1.0, "1 = yes"))
    return rows


def _main(spec: str) -> None:
    print("RESULT " + json.dumps(_child(json.loads(spec))), flush=True)
