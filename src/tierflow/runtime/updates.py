"""AdamW over tiered state.

`tierflow.AdamW` (optimizer.py) is a `torch.optim.Optimizer` (so torch LR schedulers work on its
`param_groups`), but it keeps no tensors itself: master weights, gradients and
moments live in the engine's tiers. `step()` records the update with a snapshot
of the hyper-parameters; the engine applies it to each unit just ahead of that
unit's next use (in its prefetch thread, overlapped with compute) or when the
state is read. The arithmetic is torch's own: `torch._fused_adamw_` (the kernel
behind `torch.optim.AdamW(fused=True)`), or with `fused=False` the exact
operations of torch's default single-tensor AdamW.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tierflow.core.layout import SEGMENT_ALIGN
from tierflow.memory.tiers import wait_all

# Elements; a multiple of every SIMD width of torch's CPU kernels (8 floats with AVX2, 16 with
# AVX-512). The fused CPU AdamW kernel runs whole vectors and then a scalar tail, and the two
# paths may round differently (measured: exp_avg_sq's FMA). A parameter whose size is a
# multiple of this has no scalar tail, so a fused call over it and its successors computes
# each element on the same path as a call of its own.
VECTOR_ELEMENTS = 64


@dataclass(frozen=True)
class HyperParams:
    """One param group's settings at the moment `step()` was called."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    fused: bool


@dataclass(frozen=True)
class StepGate:
    """What every update of one optimizer step reads that the compute lane produced: the clip
    coefficient (or None) and whether the gradients were all finite.

    `scale` and `found_inf` live on the compute device; the lane that runs a GPU-side update
    first waits for `ready` (recorded on the compute stream after clipping). A CPU-side update
    reads `host` ([scale, found_inf], pinned, copied asynchronously) once `host_ready` is done:
    neither waits for the GPU when the step is recorded, so the host keeps running ahead.
    """

    scale: torch.Tensor | None
    found_inf: torch.Tensor | None      # float 0.0 / 1.0: 1.0 skips the update (non-finite grads)
    host: torch.Tensor | None = None    # [scale or 1.0, found_inf] on the host
    ready: object = None                # event on the compute stream (None on CPU)
    host_ready: object = None           # event after the copy into `host` (None on CPU)

    def skipped(self) -> bool:
        """True if the gradients were not finite (reads the host copy: waits for it)."""
        if self.found_inf is None:
            return False
        return bool(self.on(torch.device("cpu"))[1])

    def on(self, device: torch.device) -> tuple:
        """(scale, found_inf) as tensors on `device` (the host copy waits for its event)."""
        if device.type != "cpu" or self.host is None:
            return self.scale, self.found_inf
        self.host_ready.synchronize()
        scale = None if self.scale is None else self.host[0]
        return scale, self.host[1]


@dataclass(frozen=True)
class PendingUpdate:
    """An AdamW step recorded for one parameter, applied later by the engine."""

    slot: object                 # layout.Slot
    hp: HyperParams
    step: int                    # the step number this update makes (1-based)
    grad_scale: torch.Tensor | None  # clip coefficient, multiplied into the gradient first
    gate: StepGate | None = None     # the engine's: scale and finiteness, ordered across lanes


def scale_and_skip(update: PendingUpdate, device: torch.device) -> tuple:
    """The clip coefficient and the found-inf flag as tensors on `device` (either may be None)."""
    if update.gate is not None:
        return update.gate.on(device)
    scale = None if update.grad_scale is None else update.grad_scale.to(device)
    return scale, None


def adamw_(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
           update: PendingUpdate) -> None:
    """Update one window of fp32 arrays in place, exactly as torch's AdamW would. Gradients
    that were not finite (the gate's found_inf) leave every array as it was."""
    scale, found_inf = scale_and_skip(update, grad.device)
    hp = update.hp
    if not hp.fused and found_inf is not None and bool(found_inf):
        return  # (reads a host copy on the CPU path; syncs on the device path, fused=False only)
    if scale is not None:
        grad.mul_(scale)  # clip_grad_norm_'s multiply, deferred to here
    if hp.fused:
        # The kernel reads, never bumps, the step; on CUDA it must live beside the arrays.
        step = torch.tensor(float(update.step), dtype=torch.float32, device=master.device)
        torch._fused_adamw_([master], [grad], [exp_avg], [exp_avg_sq], [], [step], lr=hp.lr,
                            beta1=hp.beta1, beta2=hp.beta2, weight_decay=hp.weight_decay, eps=hp.eps,
                            amsgrad=False, maximize=False, found_inf=found_inf)
        return
    # torch.optim.adam._single_tensor_adam with decoupled weight decay, operation for operation.
    if hp.weight_decay != 0:
        master.mul_(1 - hp.lr * hp.weight_decay)
    exp_avg.lerp_(grad, 1 - hp.beta1)
    exp_avg_sq.mul_(hp.beta2).addcmul_(grad, grad, value=1 - hp.beta2)
    step = float(update.step)
    bias_correction1 = 1 - hp.beta1 ** step
    bias_correction2 = 1 - hp.beta2 ** step
    step_size = hp.lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(hp.eps)
    master.addcdiv_(exp_avg, denom, value=-step_size)


def adamw_via_device(views, update: PendingUpdate, scratch: list, out: torch.Tensor) -> None:
    """AdamW of host-side arrays (a home array or an NVMe staging window) run on the GPU: each
    chunk of master, gradient and moments is copied into `scratch` (four fp32 device buffers),
    updated by the device's kernel and copied back; the new weights also go to `out` (the
    unit's device buffer). The copies are queued on the current stream: synchronise before
    the host reads the arrays."""
    master, _grad, exp_avg, exp_avg_sq = views
    chunk = scratch[0].numel()
    for a in range(0, master.numel(), chunk):
        b = min(a + chunk, master.numel())
        dev = [buf[:b - a] for buf in scratch]
        for target, source in zip(dev, views):
            target.copy_(source[a:b], non_blocking=True)
        adamw_(*dev, update)
        for target, source in ((master, dev[0]), (exp_avg, dev[2]), (exp_avg_sq, dev[3])):
            target[a:b].copy_(source, non_blocking=True)
        out[a:b].copy_(dev[0], non_blocking=True)


def same_call(a: PendingUpdate, b: PendingUpdate) -> bool:
    """Whether `b` may join the fused AdamW call that ends with `a`, with every element computed
    exactly as by per-parameter calls: the same step and settings, `a` without a scalar tail,
    and nothing but `a`'s padding between them (any slot is at least SEGMENT_ALIGN long)."""
    gap = b.slot.offset - (a.slot.offset + a.slot.numel)
    return (a.hp.fused and a.hp == b.hp and a.step == b.step and a.grad_scale is b.grad_scale
            and a.gate is b.gate and a.slot.numel % VECTOR_ELEMENTS == 0 and 0 <= gap < SEGMENT_ALIGN)


def update_runs(pending: list) -> list[tuple[int, int, PendingUpdate]]:
    """(start, numel, update) of the element ranges one AdamW call each updates: consecutive
    parameters of a unit joined while `same_call` allows (a unit's whole trainable range after a
    plain `step()` of fused AdamW, in a few calls); one parameter per call otherwise. Joined
    ranges include the padding between parameters: its elements are updated too, harmlessly
    (elementwise arithmetic; no one reads them)."""
    runs = []
    for update in sorted(pending, key=lambda u: u.slot.offset):
        if runs and same_call(runs[-1][2], update):
            start = runs[-1][0]
            runs[-1] = (start, update.slot.offset + update.slot.numel - start, update)
        else:
            runs.append((update.slot.offset, update.slot.numel, update))
    return runs


def apply_updates(io, device, state, pending: list, flat: torch.Tensor | None = None,
                  scratch: list | None = None) -> None:
    """Run AdamW over the updated parameters of one unit, window by window, in its home tier:
    one fused call per run of contiguous parameters (`update_runs`), per window.

    Lower-precision compute weights are rewritten from the new master weights; with `flat`
    (the unit's device buffer) each updated window is also copied there as it is produced.
    On NVMe the next window is read while the current one is computed and written back.
    With `scratch` (device buffers, and `flat` given) the arithmetic runs on the GPU.
    """
    names = ("master", "grad", "exp_avg", "exp_avg_sq")
    by_start = {}
    ranges = []
    for first, numel, update in update_runs(pending):
        for start, count in io.pieces(state, first, numel):
            by_start[start] = update
            ranges.append((start, count))
    writes = []
    try:
        for window in io.windows(state, names, ranges, spare=int("weights" in state.arrays)):
            start, count = window.start, window.views[0].numel()
            try:
                staged = bool(window.buffers)
                if scratch is not None:
                    adamw_via_device(window.views, by_start[start], scratch, flat[start:start + count])
                else:
                    adamw_(*window.views, by_start[start])
                if "weights" in state.arrays:
                    weights = io.open(state, ("weights",), start, count, read=False)
                    staged = staged or bool(weights.buffers)
                    source = flat[start:start + count] if scratch is not None else window.views[0]
                    weights.views[0].copy_(source, non_blocking=scratch is not None)
                if flat is not None and scratch is None:
                    # From the compute-dtype host copy when there is one: same dtype, so a true
                    # async copy from pinned memory (fp32 -> bf16 would convert on the host first).
                    source = weights.views[0] if "weights" in state.arrays else window.views[0]
                    flat[start:start + count].copy_(source, non_blocking=True)
                if staged:  # staging buffers are written back and reused once the copies are done
                    device.synchronize_event(device.record_event())
                if "weights" in state.arrays:
                    writes += io.close(weights, write=("weights",), wait=False)
            except BaseException:
                io.discard(window)
                raise
            writes += io.close(window, write=("master", "exp_avg", "exp_avg_sq"), wait=False)
        if scratch is not None:  # the host arrays are final before anyone reads them
            device.synchronize_event(device.record_event())
    finally:
        wait_all(writes)
