"""Generation beyond memory: transformers' own `generate` over a tiered model.

`engine.generate(...)` is `model.generate(...)` — the same arguments, the same output
(greedy decoding gives bitwise the same tokens) — with three things added:

* the weights stream: each forward acquires units in the traced order and the engine
  prefetches the next ones; during generation the prefetch wraps around, so while the
  last layers of one step compute, the first non-resident layers of the next step are
  already being read. Units whose home is the device (or, on a CPU, host memory) stay
  resident across steps; only NVMe-homed units are read, once per step, for the
  whole batch (a batched `generate` runs each layer over every sequence).
* the KV cache is a `TieredCache` placed by the budgets: on the device when it fits
  what the device budget leaves after the weights and their working set, else in host
  memory, else in the NVMe directory (`kv_cache=` forces a tier).
* every forward (the prefill and each decode step) is timed and its bytes counted;
  `engine.last_generation` holds the `GenerationReport`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tierflow.config import format_size
from tierflow.errors import BudgetError, ConfigError
from tierflow.infer.kvcache import KV_TIERS, TieredCache, kv_bytes
from tierflow.memory.device import return_freed_memory_to_os


@dataclass(frozen=True)
class StepStats:
    """One forward of `generate` (the prefill, then one per new token)."""

    seconds: float
    nvme_read: int        # weight bytes read from the NVMe tier (reads submitted in the step)
    host_to_device: int   # weight bytes copied to the device (NVMe- and host-homed units)
    kv_read: int          # KV-cache bytes read back from its tier
    on_demand: int = 0    # units whose fetch started only when the forward needed them (none ahead)


@dataclass
class GenerationReport:
    """What one `generate` call did: tokens, time, and bytes per step and tier."""

    batch: int
    prompt_tokens: int
    new_tokens: int = 0
    kv_tier: str = "device"
    kv_bytes: int = 0
    seconds: float = 0.0
    steps: list = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens (all sequences) per second of the whole call, prefill included."""
        return self.batch * self.new_tokens / self.seconds if self.seconds else 0.0

    @property
    def decode_steps(self) -> list:
        return self.steps[1:]

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second of the decode steps only."""
        spent = sum(s.seconds for s in self.decode_steps)
        return self.batch * len(self.decode_steps) / spent if spent else 0.0

    def total(self, name: str) -> int:
        return sum(getattr(s, name) for s in self.steps)


# A batched prefill's hidden states are 512 KiB - 1 MiB (16 x 12 tokens x 1024 x 4 bytes: 768
# KiB). Below glibc's mmap threshold they fragment its heap, which then holds ~110 MiB more than
# the forward's data (4x model, 128 + 224 MiB, batch 16: peak RSS 843 MiB with 1 MiB, 730 with
# 512 KiB, decode steps unchanged, the prefill ~0.2 s slower; docs/benchmarks.md). Under a memory
# limit that difference decides whether the process thrashes.
_FORWARD_MMAP_THRESHOLD = 512 << 10


def generate(engine, *args, kv_cache: str = "auto", **kwargs):
    """transformers' `generate` on the engine's model (bound as `Engine.generate`).

    `kv_cache`: "auto" (by the budgets), "device", "host" or "nvme". Beam search needs
    kv_cache="device". Returns what transformers' generate returns."""
    module = engine.module
    input_ids = args[0] if args else kwargs.get("input_ids")
    if input_ids is None:
        input_ids = kwargs.get("inputs")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ConfigError("generate needs input_ids, a 2-D tensor of token ids (batch, tokens)")
    batch, prompt = input_ids.shape
    report = GenerationReport(batch=batch, prompt_tokens=prompt)
    cache, reserved = None, None
    cache_kwarg = _cache_kwarg(module)
    given = kwargs.get("cache", kwargs.get("past_key_values"))
    if given is None and kwargs.get("use_cache", True) and kv_cache != "device":
        tier, nbytes = choose_kv_tier(engine, batch, _capacity(module, prompt, kwargs), kv_cache)
        report.kv_tier, report.kv_bytes = tier, nbytes
        if tier != "device":
            reserved = _reserve_kv(engine, tier, nbytes)
            cache = TieredCache(_text_config(module).num_hidden_layers, tier,
                                _capacity(module, prompt, kwargs), engine.cfg.nvme)
            kwargs.pop("past_key_values", None)
            kwargs.pop("cache", None)
            kwargs[cache_kwarg] = cache
            kwargs["use_cache"] = True  # a config with use_cache=False would bypass the cache we pass
    elif kv_cache == "device":
        report.kv_bytes = kv_bytes(module.config, batch, _capacity(module, prompt, kwargs), engine.compute_dtype)
    if not engine.device.is_cuda:
        return_freed_memory_to_os(_FORWARD_MMAP_THRESHOLD)
    recorder = _StepRecorder(engine, cache)
    engine.passes.cyclic_prefetch = True
    start = time.perf_counter()
    try:
        with recorder:
            output = module.generate(*args, **kwargs)
    finally:
        engine.passes.cyclic_prefetch = False
        if cache is not None:
            cache.close()
        if reserved is not None:
            engine.budgets[reserved[0]].release(reserved[1])
    report.seconds = time.perf_counter() - start
    report.steps = recorder.steps
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    report.new_tokens = sequences.shape[1] - prompt
    engine.last_generation = report
    return output


def choose_kv_tier(engine, batch: int, tokens: int, requested: str = "auto") -> tuple[str, int]:
    """(tier, bytes) of the KV cache of `batch` sequences of up to `tokens` tokens."""
    if requested not in ("auto",) + KV_TIERS:
        raise ConfigError(f"unknown kv_cache {requested!r}: use 'auto', 'device', 'host' or 'nvme'")
    module = engine.module
    nbytes = kv_bytes(module.config, batch, tokens, engine.compute_dtype)
    full_attention = _full_attention_only(module)
    if requested != "auto":
        if requested != "device" and not full_attention:
            raise ConfigError(f"kv_cache={requested!r}: this model has sliding-window or linear-attention "
                              f"layers, whose cache tierflow does not tier; use kv_cache='device'")
        if requested == "nvme" and engine.cfg.nvme is None:
            raise ConfigError("kv_cache='nvme' needs an NVMe directory: pass nvme=DIR")
        return requested, nbytes
    if not full_attention or nbytes <= _device_room(engine):
        return "device", nbytes
    if nbytes <= engine.budgets["host"].room() or engine.cfg.nvme is None:
        return "host", nbytes
    return "nvme", nbytes


def _device_room(engine) -> float:
    """Device bytes left after device-homed weights, buffers and the planned working set."""
    capacity = engine.budgets["device"].capacity
    if capacity is None:
        return float("inf")
    buffers = sum(b.numel() * b.element_size() for b in engine.module.buffers())
    return capacity - engine.plan.tier_bytes["device"] - buffers - engine.plan.device_working


def _reserve_kv(engine, tier: str, nbytes: int):
    """Account a host-memory cache in the host budget for the call. (An NVMe cache holds one
    or two layers' pasts in memory at a time, in use and read ahead: like activations, that
    is the process's memory, not the budgets'.)"""
    if tier != "host":
        return None
    try:
        engine.budgets["host"].reserve(nbytes, "the KV cache")
    except BudgetError as exc:
        hint = "; or pass kv_cache='nvme'" + ("" if engine.cfg.nvme else " with nvme=DIR")
        raise BudgetError(f"{exc}{hint}") from None
    return "host", nbytes


def _capacity(module, prompt: int, kwargs) -> int:
    """The longest a sequence can get in this call: prompt + new tokens."""
    gen = module.generation_config
    new = kwargs.get("max_new_tokens", gen.max_new_tokens)
    if new is not None:
        return prompt + int(new)
    return int(kwargs.get("max_length") or gen.max_length)


def _cache_kwarg(module) -> str:
    """The keyword transformers' `generate` takes a cache by: `cache` from 5.x releases whose
    models' forward takes `cache` (`past_key_values` is deprecated there), else `past_key_values`."""
    import inspect

    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def _text_config(module):
    return module.config.get_text_config(decoder=True)


def _full_attention_only(module) -> bool:
    text = _text_config(module)
    types = getattr(text, "layer_types", None)
    if types is not None:
        return all(t == "full_attention" for t in types)
    return not getattr(text, "sliding_window", None)


class _StepRecorder:
    """Times every forward of the model and counts the bytes it moved."""

    def __init__(self, engine, cache):
        self.engine, self.cache = engine, cache
        self.steps: list[StepStats] = []
        self._handles = []

    def _snapshot(self):
        # NVMe reads are counted as submitted: a step then counts what it asked for, whether a
        # read it started ahead for the next step completes before the step ends or after.
        stats, nvme = self.engine.io_stats(), self.engine.nvme
        kv = self.cache.bytes_read() if self.cache is not None else 0
        return (time.perf_counter(), nvme.bytes_requested if nvme is not None else 0, stats["host_to_device"], kv,
                self.engine.residency.on_demand)

    def _pre(self, module, args):
        self._start = self._snapshot()

    def _post(self, module, args, output):
        self.engine.device.synchronize_event(self.engine.device.record_event())
        end = self._snapshot()
        self.steps.append(StepStats(*(b - a for a, b in zip(self._start, end))))

    def __enter__(self):
        module = self.engine.module
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()


def summary_lines(engine, report: GenerationReport) -> list[str]:
    """Human-readable summary of a generation (for the CLI and the benchmark)."""
    decode = report.decode_steps
    lines = [f"{report.new_tokens} new tokens x {report.batch} sequences in {report.seconds:.2f} s: "
             f"{report.tokens_per_s:.2f} tokens/s ({report.decode_tokens_per_s:.2f} tokens/s in decode)"]
    if decode:
        per = lambda name: sum(getattr(s, name) for s in decode) / len(decode)  # noqa: E731
        lines.append(f"per decode step: {sum(s.seconds for s in decode) / len(decode) * 1e3:.0f} ms, "
                     f"NVMe read {format_size(per('nvme_read'))}, to device {format_size(per('host_to_device'))}, "
                     f"KV read {format_size(per('kv_read'))}")
    lines.append(f"bytes read in all: NVMe weights {format_size(report.total('nvme_read'))}, "
                 f"copied to device {format_size(report.total('host_to_device'))}, "
                 f"KV cache ({report.kv_tier}, {format_size(report.kv_bytes)}) {format_size(report.total('kv_read'))}")
    return lines
