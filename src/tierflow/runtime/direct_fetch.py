"""Direct fetches (CPU compute device, NVMe home, nothing to update): a frozen unit's weights go
from the disk straight into its device buffer on the NVMe threads (a compressed unit's bytes are
read whole and dequantized into it on the transfer thread), into a reused buffer where one may
be taken. A part of `Residency` (residency.py), which it extends; kept apart for its size.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future

import torch

from tierflow.core.plan import working_bytes
from tierflow.memory.tiers import aligned_flat, takes_direct_reads
from tierflow.runtime.events import Span


class DirectFetches:
    """Residency's direct fetches (uses its units, states, budgets, spares, packed, io, events)."""

    def _reads_direct(self, uid: int) -> bool:
        """The unit's weights can go from the disk straight into its (CPU) device buffer (a
        compressed unit's: dequantized there from its bytes read whole, or from host memory).
        Also a trainable unit's, when the fetch applies no update (`start_fetch` asks only
        then): its last update's write-backs were complete before that update's job ended
        (`apply_updates` waits for them), and no update starts while a fetch is in flight
        (`update_now` finishes it first)."""
        state = self.states[uid]
        if self.device.is_cuda or self.dist is not None:
            return False
        if self.units[uid].weights is not None:
            return self.packed.reads_direct(state)
        return self.io.reads_whole(state, self._weights_name(uid), self.compute_dtype)

    def _reusable_buffer(self, numel: int, nbytes: int, ahead: int | None) -> torch.Tensor | None:
        """A buffer of `numel` elements whose device bytes stay reserved for the caller: a spare
        one; else None when the budget has room for a new one; else that of the first
        evictable unit of the same size (`victims(ahead)`). Units of a
        decoder repeat their sizes layer after layer, so a generation step reuses the buffers
        of the previous one: fresh memory costs page faults and freed memory TLB shootdowns
        (measured on 2 cores: compute ran up to 3x slower next to that churn)."""
        flat = self.spares.pop(numel)
        if flat is None:
            if self.budgets["device"].room() >= nbytes:  # (other threads only give bytes back)
                return None
            same = [uid for uid in self.victims(ahead) if self.units[uid].numel == numel]
            if not same:
                return None
            flat = self._detach(same[0])  # (a compressed unit's read bytes are not taken over)
            self.budgets["device"].release(working_bytes(self.units[same[0]], self.compute_dtype)
                                           - flat.numel() * flat.element_size())
        if not takes_direct_reads(flat):  # allocated by a fetch through the transfer thread
            self.budgets["device"].release(flat.numel() * flat.element_size())
            return None
        return flat

    def _direct_fetch(self, uid: int, flat: torch.Tensor | None) -> Future:
        """Read the unit's weights into an aligned buffer on the NVMe threads, without the
        transfer thread, the staging buffers or a copy: the fetches of every unit in the
        prefetch window are in flight at once, which keeps the disk's queue full (measured
        on the 2-core machines: ~1.0 GB/s through the staging path, ~2.7 direct)."""
        unit = self.units[uid]
        if flat is None:
            flat = aligned_flat(unit.numel, self.compute_dtype)
        if unit.weights is not None:
            return self._packed_fetch(uid, flat)
        done = Future()
        done.set_running_or_notify_cancel()
        start, nbytes = self.events.now(), flat.numel() * flat.element_size()
        reading = self.io.read_whole_async(self.states[uid], self._weights_name(uid), flat)
        self.count("host_to_device", nbytes)  # when asked for, as the NVMe reads (generate.py's steps)

        def finished(read: Future) -> None:
            error = read.exception()
            if error is not None:
                done.set_exception(error)
                return
            if self.events.enabled:
                self.events.add(Span("fetch", unit.name, start, self.events.now(), nbytes,
                                     threading.current_thread().name))
            done.set_result((flat, None))

        reading.add_done_callback(finished)
        return done

    def _packed_fetch(self, uid: int, flat: torch.Tensor) -> Future:
        """A compressed unit: its bytes are read now (with the other units' reads in flight);
        the transfer thread dequantizes them into `flat` when they arrive, one unit after the
        other in the order they are needed, while the compute thread works on earlier units."""
        unit = self.units[uid]
        reading, data = self.packed.start_read(self.states[uid], uid)

        def dequantize():
            with self.events.span("fetch", unit.name, data.numel()):
                moved = self.packed.dequantize_read(unit, reading, data, flat)
            self.count("host_to_device", moved)
            return flat, None

        return self.transfer.submit(dequantize)

    def _weights_name(self, uid: int) -> str:
        return "weights" if "weights" in self.states[uid].arrays else "master"
