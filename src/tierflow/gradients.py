"""Gradients leave the device as soon as autograd has accumulated them.

A drain thread adds each gradient (cast to fp32) into its unit's gradient array
in the unit's home tier and records the norm of the accumulated gradient, so
global-norm clipping needs no second pass over the tiers and gives exactly what
`torch.nn.utils.clip_grad_norm_` gives (same per-parameter norms, same order,
same arithmetic). The clip coefficient is not multiplied into the stored
gradients here: AdamW multiplies each window just before it uses it.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .budget import Budget
from .errors import ConfigError
from .layout import Slot
from .tiers import FP32, StateIO, UnitState


class GradientSink:
    """Accumulates gradients into their tiers and keeps what clipping needs."""

    def __init__(self, io: StateIO, device_budget: Budget, device, count, events):
        self.io = io
        self.device_budget = device_budget
        self.device = device
        self._count = count                        # count(key, nbytes): engine's I/O counters
        self.events = events
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tierflow-drain")
        self._futures: list[Future] = []
        self.has_grad: set[int] = set()            # slot indices with a gradient since zero()
        self.norms: dict[int, torch.Tensor] = {}   # slot index -> norm of its accumulated grad
        self.scale: torch.Tensor | None = None     # clip coefficient for the coming step

    def submit(self, state: UnitState, slot: Slot, grad: torch.Tensor, nbytes: int) -> None:
        """Queue one gradient; `nbytes` of device budget are released once it has left."""
        fresh = slot.index not in self.has_grad
        self.has_grad.add(slot.index)
        if state.home == "device" and self.device.is_cuda:
            # Into a GPU-resident home: a few queued kernels; a thread hand-off would cost more.
            self._drain(state, slot, grad, fresh, nbytes)
            return
        self._futures.append(self._executor.submit(self._drain, state, slot, grad, fresh, nbytes))

    def _drain(self, state: UnitState, slot: Slot, grad: torch.Tensor, fresh: bool, nbytes: int) -> None:
        """Drain thread: copy (first micro-batch) or add (later ones) into the fp32 gradient."""
        with self.events.span("drain", slot.name, nbytes):
            self._accumulate(state, slot, grad, fresh, nbytes)

    def _accumulate(self, state: UnitState, slot: Slot, grad: torch.Tensor, fresh: bool, nbytes: int) -> None:
        try:
            incoming = grad.detach().reshape(-1).to(FP32)  # the engine took `grad`: ours to reuse
            if state.home != "device":
                self._count("device_to_host", nbytes)
            if fresh:
                self.norms[slot.index] = torch.linalg.vector_norm(incoming)
            pieces = list(self.io.pieces(state, slot.offset, slot.numel))
            norm = None
            for start, count in pieces:
                window = self.io.open(state, ("grad",), start, count, read=not fresh)
                try:
                    target = window.views[0]
                    part = incoming[start - slot.offset:start - slot.offset + count]
                    if fresh:
                        target.copy_(part)  # straight into the (pinned) home or staging buffer
                    else:
                        target.add_(part if target.device == part.device else self.device.to_host(part))
                        if len(pieces) == 1:
                            norm = torch.linalg.vector_norm(target)  # before the window is released
                        else:  # gather the sum back: its norm is then taken in one piece
                            part.copy_(target)
                except BaseException:
                    self.io.close(window)
                    raise
                self.io.close(window, write=("grad",))
            if not fresh:
                # The norm of the whole accumulated gradient, as torch takes it: a norm combined
                # from windows' norms would differ in the last bit (it did on 16 threads).
                self.norms[slot.index] = norm if norm is not None else torch.linalg.vector_norm(incoming)
        finally:
            self.device_budget.release(nbytes)

    def wait(self) -> None:
        """Block until every queued gradient is in its tier (drain errors surface here)."""
        futures, self._futures = self._futures, []
        for future in futures:
            future.result()

    def zero(self) -> None:
        """The next backward starts afresh (after the optimizer recorded what it needs)."""
        self.wait()
        self.has_grad.clear()
        self.norms.clear()
        self.scale = None

    def clip(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> torch.Tensor:
        """Total L2 norm over all gradients; sets the coefficient AdamW will apply."""
        if float(norm_type) != 2.0:
            raise ConfigError("tierflow clips by the L2 norm only (norm_type=2)")
        self.wait()
        target = self.device.device
        norms = [self.norms[i].to(target) for i in sorted(self.norms)]
        if not norms:
            return torch.tensor(0.0, device=target)
        total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
        if error_if_nonfinite and (total.isnan() or total.isinf()):
            raise RuntimeError(f"the total norm of gradients is non-finite ({total.item()})")
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        self.scale = coef if self.scale is None else self.scale * coef
        return total

    def close(self) -> None:
        self._executor.shutdown(wait=True)
