"""`tierflow bench activations`: longest sequence that trains within one device budget, and step time.

Three contenders train the same Llama (same seed, batch 1, random tokens):

* `torch`: plain PyTorch, every activation kept;
* `hf-checkpointing`: PyTorch with `model.gradient_checkpointing_enable()` (Hugging Face's
  per-layer checkpointing, its default reentrant flavour);
* `tierflow-auto`: `tierflow.offload(..., device_memory=BUDGET, activations="auto")`.

What counts against the device budget (on a CPU the "device" is a RAM budget):

* tierflow: the engine's own accounting (`engine.budget_peaks()["device"]`): weights in use
  and in flight, gradients in flight, state homed on the device, kept activations and
  activations being copied out or back. A step that does not fit raises BudgetError.
* PyTorch (both): its whole training state on the device (16 bytes per parameter: weights,
  gradients, two Adam moments) plus the peak bytes of the tensors autograd saves for
  backward, counted by saved-tensor hooks through forward and backward (recomputation in
  backward included), once per storage, from when autograd saves a tensor until it frees it.

Neither counts the short-lived temporaries of an op (the same for all three). The longest
length is searched on a grid of `--grain` tokens: doubling, then bisection. Step times are
then measured at one length every contender except plain PyTorch can train (the longest both
`hf-checkpointing` and `tierflow-auto` fit), steps interleaved so machine noise hits all alike.
"""
from __future__ import annotations

import statistics
import time
import warnings

import torch

import tierflow
from tierflow.runtime.activations import Ledger
from tierflow.bench.report import write_json
from tierflow.memory.budget import Budget
from tierflow.errors import BudgetError

VOCAB = 320


def _model(layers: int, hidden: int, seed: int = 0):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                                   num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
                                   num_key_value_heads=max(1, hidden // 32), max_position_embeddings=1 << 16,
                                   use_cache=False, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.train()
    return model


class _Saved:
    __slots__ = ("tensor", "__weakref__")


class SavedBytesMeter:
    """Peak bytes of tensors autograd holds for backward (by storage), via saved-tensor hooks."""

    def __init__(self):
        self.budget = Budget("saved", None)
        self._ledger = Ledger(lambda n, what: self.budget.reserve(n, what), self.budget)

    def _pack(self, tensor):
        holder = _Saved()
        holder.tensor = tensor
        self._ledger.hold([tensor], holder)
        return holder

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda holder: holder.tensor)


def _batch(seq_len: int):
    ids = torch.randint(0, VOCAB, (1, seq_len), generator=torch.Generator().manual_seed(seq_len))
    return {"input_ids": ids, "labels": ids}


class TorchContender:
    """Plain PyTorch (optionally with Hugging Face gradient checkpointing)."""

    def __init__(self, layers, hidden, checkpointing: bool):
        self.model = _model(layers, hidden)
        if checkpointing:
            self.model.gradient_checkpointing_enable()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        self.state_bytes = 16 * sum(p.numel() for p in self.model.parameters())

    def step(self, batch, meter=None) -> float:
        start = time.perf_counter()
        if meter is None:
            self.model(**batch).loss.backward()
        else:
            with meter.hooks():
                self.model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad()
        return time.perf_counter() - start

    def device_bytes(self, seq_len: int) -> int:
        meter = SavedBytesMeter()
        self.step(_batch(seq_len), meter)
        return self.state_bytes + meter.budget.peak

    def close(self):
        pass


class TierflowContender:
    def __init__(self, layers, hidden, budget, host, nvme):
        self.engine = tierflow.offload(_model(layers, hidden), device_memory=budget, host_memory=host,
                                       nvme=nvme, activations="auto")
        self.opt = tierflow.AdamW(self.engine, lr=1e-4)

    def step(self, batch) -> float:
        start = time.perf_counter()
        self.engine(**batch).loss.backward()
        self.opt.clip_grad_norm_(1.0)
        self.opt.step()
        self.opt.zero_grad()
        return time.perf_counter() - start

    def close(self):
        self.engine.close()


def _fits(name, seq_len, args) -> tuple[bool, int]:
    """(trains within the budget, accounted peak device bytes) for one contender at one length."""
    if name == "tierflow-auto":
        contender = TierflowContender(args["layers"], args["hidden"], args["budget"], args["host"], args["nvme"])
        try:
            for _ in range(2):  # the measured first step, then the chosen policy
                contender.step(_batch(seq_len))
            return True, contender.engine.budget_peaks()["device"][0]
        except BudgetError:
            return False, contender.engine.budget_peaks()["device"][0]
        finally:
            contender.close()
    contender = TorchContender(args["layers"], args["hidden"], checkpointing=name == "hf-checkpointing")
    peak = contender.device_bytes(seq_len)
    return peak <= args["budget_bytes"], peak


def longest(name, args, grain: int, limit: int) -> tuple[int, dict]:
    """Longest multiple of `grain` (up to `limit`) that trains; and the peak seen per length."""
    seen = {}

    def ok(n):
        fits, peak = _fits(name, n, args)
        seen[n] = peak
        print(f"  {name:<17} seq {n:>6}: {'fits' if fits else 'does not fit'} "
              f"({peak / 2**20:.1f} MiB accounted)", flush=True)
        return fits

    good, bad = 0, None
    n = grain
    while n <= limit:
        if not ok(n):
            bad = n
            break
        good, n = n, n * 2
    if bad is None:
        return good, seen
    while bad - good > grain:
        mid = (good + bad) // 2 // grain * grain
        if ok(mid):
            good = mid
        else:
            bad = mid
    return good, seen


def run_activations_bench(layers: int = 16, hidden: int = 128, device_memory: str = "160MiB",
                          host_memory: str = "4GiB", grain: int = 256, limit: int = 32768, steps: int = 3,
                          nvme: str | None = None, json_path=None) -> dict:
    budget_bytes = tierflow.parse_size(device_memory)
    args = dict(layers=layers, hidden=hidden, budget=device_memory, host=host_memory, nvme=nvme,
                budget_bytes=budget_bytes)
    params = sum(p.numel() for p in _model(layers, hidden).parameters())
    print(f"Llama {layers} layers, hidden {hidden}: {params / 1e6:.2f} M parameters; device budget "
          f"{device_memory}, host {host_memory}; batch 1; lengths on a grid of {grain}")
    result = {"layers": layers, "hidden": hidden, "params": params, "device_memory": budget_bytes,
              "longest": {}, "peaks": {}}
    for name in ("torch", "hf-checkpointing", "tierflow-auto"):
        best, seen = longest(name, args, grain, limit)
        result["longest"][name] = best
        result["peaks"][name] = seen
    args["torch_longest"] = result["longest"]["torch"]
    common = min(result["longest"]["hf-checkpointing"], result["longest"]["tierflow-auto"])
    result["timed_length"] = common
    result["step_seconds"] = _time_at(common, args, steps) if common else {}
    _print(result)
    if json_path:
        write_json([result], json_path)
    return result


def _time_at(seq_len, args, steps) -> dict:
    """Median step time of each contender that fits `seq_len` (after two warm-up steps)."""
    contenders = {"hf-checkpointing": TorchContender(args["layers"], args["hidden"], checkpointing=True),
                  "tierflow-auto": TierflowContender(args["layers"], args["hidden"], args["budget"],
                                                     args["host"], args["nvme"])}
    if seq_len <= args.get("torch_longest", 0):
        contenders["torch"] = TorchContender(args["layers"], args["hidden"], checkpointing=False)
    times = {name: [] for name in contenders}
    try:
        for i in range(steps + 2):
            for name, contender in contenders.items():
                seconds = contender.step(_batch(seq_len))
                if i >= 2:
                    times[name].append(seconds)
        policy = contenders["tierflow-auto"].engine.activations.describe()
    finally:
        for contender in contenders.values():
            contender.close()
    print(f"tierflow-auto at {seq_len}: {policy}")
    return {name: statistics.median(t) for name, t in times.items()}


def _print(result: dict) -> None:
    longest = result["longest"]
    base = longest["torch"]
    print("\nlongest sequence within the device budget:")
    for name, n in longest.items():
        versus = f"{n / base:.1f}x plain PyTorch" if base else "plain PyTorch fits none"
        print(f"  {name:<17} {n:>6} tokens  ({versus})")
    secs = result["step_seconds"]
    if secs:
        print(f"step time at {result['timed_length']} tokens:")
        for name, s in secs.items():
            print(f"  {name:<17} {s:.2f} s")
        ratio = secs["tierflow-auto"] / secs["hf-checkpointing"]
        print(f"  tierflow-auto / hf-checkpointing = {ratio:.2f}")
        result["time_ratio"] = ratio
