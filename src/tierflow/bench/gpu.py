"""Train plain PyTorch and tierflow side by side on a GPU that lags behind the host.

The building blocks of `tests/test_cuda_lagging.py` and of `tierflow bench gpu`
(gpu_check.py): the same initial weights and the same batches for every contender,
one training loop for all of them, and sleep kernels that make the GPU fall behind.

Why the lag: a missing stream dependency (a buffer reused or a tensor read before the
GPU is done with it) is invisible when the GPU keeps up with the host, as it does for
tiny models or when the loop calls `.item()` every step. `torch.cuda._sleep` queues a
kernel that only waits, so the host runs far ahead and a missing wait shows up as wrong
numbers. The loop therefore never reads a value back to the host: losses are kept as
device tensors and read after the last step.

Everything here also runs with device="cpu" (no lag there: CPU work is synchronous),
which is how the CPU tests exercise it.
"""
from __future__ import annotations

import copy
import gc
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

import tierflow


@dataclass(frozen=True)
class ModelShape:
    """Size of a Llama with untied input/output embeddings and no grouped-query attention."""

    hidden: int = 2048
    layers: int = 16
    intermediate: int = 5504
    heads: int = 32
    vocab: int = 32000

    def config(self, max_positions: int = 2048):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.heads, max_position_embeddings=max_positions,
                           tie_word_embeddings=False, use_cache=False)


ONE_B = ModelShape()  # the 0.94 B model of the NaN report
LAGGING = ModelShape(hidden=1024, layers=4, intermediate=2816, heads=16, vocab=2048)  # tests: ~55 M
TINY = ModelShape(hidden=64, layers=2, intermediate=128, heads=4, vocab=96)  # CPU smoke runs


def build_initial_model(shape: ModelShape, seed: int, device: str, max_positions: int = 2048) -> nn.Module:
    """The model with its seeded random init, on the CPU, fp32.

    On a GPU the init runs there (seconds instead of a minute for 1 B parameters on the
    CPU); every contender then starts from a deep copy of the returned model.
    """
    import transformers

    def build(init_device):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.device(init_device):
                return transformers.AutoModelForCausalLM.from_config(shape.config(max_positions))

    try:
        model = build(device)
    except Exception as exc:  # noqa: BLE001 -- an init the GPU refuses still has the CPU's (slower)
        if torch.device(device).type == "cpu":
            raise
        print(f"building the model on {device} failed ({type(exc).__name__}: {exc}); building it on the CPU")
        model = build("cpu")
    return model.to("cpu", torch.float32)


def make_batches(steps: int, batch: int, seq_len: int, vocab: int, device: str, seed: int = 1,
                 distinct: int | None = None) -> list:
    """Random token ids (seeded), already on the compute device: one tensor per step.

    With `distinct`, only that many different batches, repeated in turn: the model then
    memorises them and its loss falls within a few steps, so a step that trained on wrong
    weights shows in the losses (on fresh random tokens the loss barely moves whatever the
    weights are)."""
    gen = torch.Generator().manual_seed(seed)
    unique = [torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)
              for _ in range(min(steps, distinct or steps))]
    return [unique[i % len(unique)] for i in range(steps)]


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: `model.model.layers` for Hugging Face Llama-likes, else the
    longest ModuleList in the model."""
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return list(inner.layers)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"no block list found in {type(model).__name__}")
    return list(max(lists, key=len))


_CYCLES_PER_MS: float | None = None


def cycles_per_ms() -> float:
    """GPU clock cycles per millisecond of `torch.cuda._sleep`, measured once (about 2e6 on an
    H100 at boost clock; measuring avoids assuming the clock of whatever GPU is lent)."""
    global _CYCLES_PER_MS
    if _CYCLES_PER_MS is None:
        cycles = 20_000_000
        torch.cuda._sleep(1000)  # warm-up: the first launch pays for loading the kernel
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _CYCLES_PER_MS = cycles / max(start.elapsed_time(end), 1e-3)
    return _CYCLES_PER_MS


class GpuLag:
    """Queues a sleep kernel on the current stream at the start of every decoder block's
    forward (also when a recomputed block runs again in backward) and wherever `sleep()` is
    called, so that the host runs `ms` milliseconds per sleep ahead of the GPU. A no-op on the
    CPU or with ms <= 0."""

    def __init__(self, model: nn.Module, ms: float, device: str):
        on_gpu = torch.device(device).type == "cuda" and ms > 0
        self.cycles = int(ms * cycles_per_ms()) if on_gpu else 0
        self._handles = []
        if self.cycles:
            # prepend: the sleep is queued before tierflow's own pre-hooks (its fetch of the
            # block's weights), so everything the engine queues for the block lands behind it.
            self._handles = [block.register_forward_pre_hook(self._pre_hook, prepend=True)
                             for block in decoder_blocks(model)]

    def _pre_hook(self, module, args) -> None:
        self.sleep()

    def sleep(self) -> None:
        if self.cycles:
            torch.cuda._sleep(self.cycles)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


FAULTS = ("none", "nan", "diverge")


def inject_fault(model: nn.Module, kind: str, from_step: int = 1):
    """Corrupt the logits from the `from_step`-th forward on (0-based), so that a checker can be
    shown to fail: "nan" makes them NaN, "diverge" scales them by 4 (a loss far from the
    reference's, finite). Returns the hook handle, or None for "none"."""
    if kind not in FAULTS:
        raise ValueError(f"unknown fault {kind!r}: use one of {FAULTS}")
    if kind == "none":
        return None
    calls = [0]

    def corrupt(module, args, output):
        calls[0] += 1
        if calls[0] <= from_step:
            return output
        return output * float("nan") if kind == "nan" else output * 4.0

    return model.get_output_embeddings().register_forward_hook(corrupt)


class StepClock:
    """Step boundaries timed without waiting for the device: CUDA events on the current stream
    (their spacing is the step period the GPU actually ran at, its stalls included), or the
    host clock on the CPU, where work is synchronous."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        """Seconds between consecutive marks (waits for the device)."""
        if self.cuda and self.marks:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def train_steps(model, opt, clip, batches, autocast_dtype=None, lag: GpuLag | None = None,
                clock: StepClock | None = None) -> list[torch.Tensor]:
    """One optimizer step per batch (forward, backward, clip at 1.0, step, zero_grad); returns
    the losses as detached fp32 device tensors. Nothing is read back to the host in here, so
    the host may run ahead of the device (see the module docstring)."""
    device_type = batches[0].device.type
    losses = []
    for ids in batches:
        if clock is not None:
            clock.mark()
        with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if lag is not None:
            lag.sleep()  # the GPU is still busy when clipping reads the gradients
        clip()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach().float())
    if clock is not None:
        clock.mark()
    return losses


@dataclass
class RunResult:
    """What one contender produced; `state` (final weights, CPU) only when asked for."""

    name: str
    losses: list[float]
    step_s: list[float]
    total_s: float
    peak_device_bytes: int | None
    info: dict = field(default_factory=dict)
    state: dict | None = None


def reset_peak(device: str) -> None:
    """Collect garbage; on CUDA free the allocator's cache and restart its peak statistics."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else None


def _timed_training(name, model, opt, clip, batches, device, autocast_dtype, lag) -> RunResult:
    clock = StepClock(device)
    start = time.perf_counter()
    losses = train_steps(model, opt, clip, batches, autocast_dtype, lag, clock)
    values = torch.stack(losses).cpu().tolist()  # the first read of the device: after the loop
    total = time.perf_counter() - start
    return RunResult(name, values, clock.step_seconds(), total, _peak(device))


def run_torch(initial: nn.Module, batches, device: str, dtype: torch.dtype, lr: float, lag_ms: float = 0.0,
              keep_state: bool = False) -> RunResult:
    """Plain PyTorch: fp32 weights on the device, autocast for bf16, fused AdamW, torch's clip."""
    reset_peak(device)
    model = copy.deepcopy(initial).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    params = [p for p in model.parameters() if p.requires_grad]
    lag = GpuLag(model, lag_ms, device)
    autocast_dtype = None if dtype == torch.float32 else dtype
    result = _timed_training("torch", model, opt, lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
                             batches, device, autocast_dtype, lag)
    lag.remove()
    if keep_state:
        result.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    del model, opt, params
    return result


def run_tierflow(name: str, initial: nn.Module, batches, device: str, dtype: torch.dtype, lr: float,
                 offload_kwargs: dict, lag_ms: float = 0.0, fault: str = "none",
                 keep_state: bool = False) -> RunResult:
    """tierflow: the engine in `dtype` (master weights and moments fp32), tierflow.AdamW with
    its exact global-norm clip; `fault` corrupts this contender on purpose (checker tests)."""
    reset_peak(device)
    model = copy.deepcopy(initial)
    engine = tierflow.offload(model, device=device, dtype=None if dtype == torch.float32 else dtype,
                              **offload_kwargs)
    try:
        opt = tierflow.AdamW(engine, lr=lr)
        lag = GpuLag(engine.module, lag_ms, device)
        hook = inject_fault(engine.module, fault)
        io_before = engine.io_stats()
        result = _timed_training(name, engine, opt, lambda: opt.clip_grad_norm_(1.0), batches, device, None, lag)
        result.info = engine_info(engine, io_before, len(batches))
        lag.remove()
        if hook is not None:
            hook.remove()
        if keep_state:
            result.state = {k: v.detach().to("cpu", copy=True) for k, v in engine.state_dict().items()}
    finally:
        engine.close()
    return result


def engine_info(engine, io_before: dict, steps: int) -> dict:
    """Homes per tier, bytes moved per step and the budgets' high-water marks."""
    io_after = engine.io_stats()
    return {"homes": {tier: engine.plan.homes.count(tier) for tier in ("device", "host", "nvme")},
            "gpu_updates": sum(engine.plan.device_updates),
            "io_per_step": {k: (io_after[k] - io_before.get(k, 0)) / max(steps, 1) for k in io_after},
            "budget_peaks": {tier: list(v) for tier, v in engine.budget_peaks().items()}}


def max_relative_difference(got: list[float], ref: list[float]) -> float:
    """max |got - ref| / |ref| over the steps; inf when a value is not finite or lengths differ."""
    if len(got) != len(ref) or not got:
        return math.inf
    worst = 0.0
    for g, r in zip(got, ref):
        if not (math.isfinite(g) and math.isfinite(r)):
            return math.inf
        worst = max(worst, abs(g - r) / max(abs(r), 1e-12))
    return worst


def weight_mismatches(ref: dict, got: dict, rtol: float, atol: float, outlier_fraction: float,
                      outlier_bound: float) -> list[str]:
    """Tensors whose final weights differ from the reference's by more than allowed.

    Element-wise |got - ref| <= atol + rtol |ref| must hold for all but `outlier_fraction` of
    each tensor's elements, and those few stay within `outlier_bound`: AdamW's first update is
    about lr * sign(gradient), so a gradient within rounding noise of zero (GPU atomics, other
    GEMM kernels) moves its weight by up to 2 lr the other way, legitimately. A real ordering
    bug (stale weights, a lost update) moves whole tensors, far beyond both limits. (A
    relative-norm limit would not do: a handful of legitimate 2 lr flips in a 1024x1024
    tensor already give a relative norm of ~1e-3.)
    """
    problems = []
    for key, r in ref.items():
        g = got.get(key)
        if g is None or g.shape != r.shape:
            problems.append(f"{key}: missing or shape {None if g is None else tuple(g.shape)} vs {tuple(r.shape)}")
            continue
        r64, g64 = r.double(), g.double()
        diff = (g64 - r64).abs()
        if not torch.isfinite(g64).all():
            problems.append(f"{key}: not finite")
            continue
        outside = diff > atol + rtol * r64.abs()
        fraction = outside.float().mean().item()
        if fraction > outlier_fraction or diff.max().item() > outlier_bound:
            problems.append(f"{key}: {fraction:.2e} of elements off (limit {outlier_fraction:g}), max diff "
                            f"{diff.max().item():.3g} (limit {outlier_bound:g})")
    return problems


def median_after_warmup(seconds: list[float], warmup: int = 2) -> float | None:
    """Median step time without the first steps (tierflow records its unit order on step 1);
    None when no step is left after them (no figure rather than one of warm-up steps)."""
    rest = seconds[warmup:]
    return statistics.median(rest) if rest else None
