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
WIDEN_ELEMENTS = 64 * 4096  # a packed gradient is widened this many elements at a time (1 MiB)


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
    grad_dtype: torch.dtype | None = None  # the unit's gradients are packed in it (gradients.py)


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
        # The kernel reads, never bumps, the step; on CUDA it must live beside the arrays. A fill
        # kernel, not torch.tensor(step, device=cuda): that copies from pageable memory and
        # synchronises the stream, so the host would wait for the GPU at every device-side update.
        step = torch.full((), float(update.step), dtype=torch.float32, device=master.device)
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


def adamw_widening(master, grad, exp_avg, exp_avg_sq, update: PendingUpdate) -> None:
    """`adamw_`, for a gradient that may be packed in a 2-byte dtype: widened to fp32 a piece at a
    time (cache-sized, so the copy costs no memory traffic), one call per piece. Pieces are whole
    multiples of VECTOR_ELEMENTS, so every element takes the kernel's path it takes in one call."""
    if grad.dtype == master.dtype:
        adamw_(master, grad, exp_avg, exp_avg_sq, update)
        return
    for a in range(0, master.numel(), WIDEN_ELEMENTS):
        b = min(a + WIDEN_ELEMENTS, master.numel())
        adamw_(master[a:b], grad[a:b].to(master.dtype), exp_avg[a:b], exp_avg_sq[a:b], update)


class DeviceAdamW:
    """AdamW of host-side arrays (a home array or an NVMe staging window) run on the GPU, as
    a pipeline over chunks that uses both directions of the PCIe link at once.

    `scratch` holds two sets of four fp32 device buffers (master, gradient, moments). For
    each chunk, on the current lane (copy): wait until the drain lane has read the set back,
    upload the chunk, run the kernel, copy the new weights into the unit's device buffer;
    then on the drain lane: wait for that, download master and moments. So chunk i+1 goes up
    while chunk i comes down (one stream would serialise them: half the link idle).
    `finish()` blocks until the host arrays are final.
    """

    SETS = 2
    ARRAYS = 4

    def __init__(self, device, scratch: list):
        self.device = device
        self.sets = [scratch[i * self.ARRAYS:(i + 1) * self.ARRAYS] for i in range(self.SETS)]
        self.freed = [None] * self.SETS   # drain-lane event per set: its buffers may be refilled
        self.turn = 0
        for buf in scratch:  # allocated on the copy lane, read by the drain lane too
            device.hand_over_to_lane(buf, "drain")

    def update(self, views, update: PendingUpdate, out: torch.Tensor, host_weights=None) -> None:
        """Queue the update of one window (`views`: master, grad, exp_avg, exp_avg_sq on the
        host); the new weights also go to `out`, a device buffer, and from there to
        `host_weights` (the unit's compute-dtype host copy, if it has one)."""
        master = views[0]
        chunk = self.sets[0][0].numel()
        for a in range(0, master.numel(), chunk):
            b = min(a + chunk, master.numel())
            s, self.turn = self.turn, (self.turn + 1) % self.SETS
            dev = [buf[:b - a] for buf in self.sets[s]]
            self.device.wait_event(self.freed[s])
            for target, source in zip(dev, views):
                if source.dtype != target.dtype:  # a packed gradient: 2 B over the link, widened there
                    target.copy_(source[a:b].to(target.device, non_blocking=True))
                else:
                    target.copy_(source[a:b], non_blocking=True)
            adamw_(*dev, update)
            out[a:b].copy_(dev[0], non_blocking=True)
            computed = self.device.record_event()
            with self.device.lane("drain"):
                self.device.wait_event(computed)
                for target, source in ((views[0], dev[0]), (views[2], dev[2]), (views[3], dev[3])):
                    target[a:b].copy_(source, non_blocking=True)
                if host_weights is not None:
                    host_weights[a:b].copy_(out[a:b], non_blocking=True)
                self.freed[s] = self.device.record_event()

    def finish(self) -> None:
        """Block until every queued download is done (then the host may read or reuse the
        arrays), and the current lane's work with it."""
        for event in self.freed:
            self.device.synchronize_event(event)
        self.device.synchronize_lane()


def same_call(a: PendingUpdate, b: PendingUpdate) -> bool:
    """Whether `b` may join the fused AdamW call that ends with `a`, with every element computed
    exactly as by per-parameter calls: the same step and settings, `a` without a scalar tail,
    and nothing but `a`'s padding between them (any slot is at least SEGMENT_ALIGN long)."""
    gap = b.slot.offset - (a.slot.offset + a.slot.numel)
    return (a.hp.fused and a.hp == b.hp and a.step == b.step and a.grad_scale is b.grad_scale
            and a.gate is b.gate and a.grad_dtype == b.grad_dtype and a.slot.numel % VECTOR_ELEMENTS == 0
            and 0 <= gap < SEGMENT_ALIGN)


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
    With `scratch` (two sets of four device buffers, and `flat` given) the arithmetic runs on
    the GPU (`DeviceAdamW`).
    """
    on_device = DeviceAdamW(device, scratch) if scratch is not None else None
    names = ("master", "grad", "exp_avg", "exp_avg_sq")
    grad_dtype = pending[0].grad_dtype if pending else None  # (one step's updates: one form per unit)
    packed = {"grad": grad_dtype} if grad_dtype is not None else None
    by_start = {}
    ranges = []
    for first, numel, update in update_runs(pending):
        for start, count in io.pieces(state, first, numel):
            by_start[start] = update
            ranges.append((start, count))
    writes = []
    try:
        for window in io.windows(state, names, ranges, spare=int("weights" in state.arrays), packed=packed):
            start, count = window.start, window.views[0].numel()
            weights = None
            try:
                staged = bool(window.buffers)
                weights = io.open(state, ("weights",), start, count, read=False) if "weights" in state.arrays else None
                staged = staged or bool(weights is not None and weights.buffers)
                if on_device is not None:  # (the new weights reach the host copy on the drain lane)
                    on_device.update(window.views, by_start[start], flat[start:start + count],
                                     weights.views[0] if weights is not None else None)
                else:
                    adamw_widening(*window.views, by_start[start])
                    if weights is not None:
                        weights.views[0].copy_(window.views[0])
                if flat is not None and on_device is None:
                    # From the compute-dtype host copy when there is one: same dtype, so a true
                    # async copy from pinned memory (fp32 -> bf16 would convert on the host first).
                    source = weights.views[0] if weights is not None else window.views[0]
                    flat[start:start + count].copy_(source, non_blocking=True)
                if staged and on_device is not None:  # staging buffers are written back and
                    on_device.finish()                # reused once the copies are done
                elif staged:
                    device.synchronize_lane()
                if weights is not None:
                    writes += io.close(weights, write=("weights",), wait=False)
            except BaseException:
                io.discard(window)
                if weights is not None:
                    io.discard(weights)
                raise
            writes += io.close(window, write=("master", "exp_avg", "exp_avg_sq"), wait=False)
        if on_device is not None:  # the host arrays are final before anyone reads them
            on_device.finish()
    finally:
        wait_all(writes)
