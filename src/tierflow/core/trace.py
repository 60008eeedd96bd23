"""Records the order in which units are first used in a forward pass.

The first step records; later steps compare what they see with the record and
re-record when the model takes a different path (a changed order only makes
prefetch guess wrong, never makes results wrong). Backward uses the reverse
of the forward order.
"""
from __future__ import annotations


class Trace:
    """Unit ids in first-use order of the last complete forward pass."""

    def __init__(self):
        self.order: list[int] = []
        self._position: dict[int, int] = {}
        self._recording: list[int] = []
        self._seen: set[int] = set()
        self.changes = 0  # how many times the recorded order was replaced

    def begin(self) -> None:
        self._recording, self._seen = [], set()

    def record(self, uid: int) -> None:
        if uid not in self._seen:
            self._seen.add(uid)
            self._recording.append(uid)

    def end(self) -> None:
        if self._recording and self._recording != self.order:
            self.order = self._recording
            self._position = {uid: i for i, uid in enumerate(self.order)}
            self.changes += 1

    def position(self, uid: int) -> int:
        """Index of `uid` in the recorded order (a large number when unknown)."""
        return self._position.get(uid, len(self.order))

    def after(self, uid: int) -> list[int]:
        """Units recorded after `uid` (forward direction)."""
        if uid not in self._position:
            return []
        return self.order[self._position[uid] + 1:]

    def before(self, uid: int) -> list[int]:
        """Units recorded before `uid`, nearest first (backward direction)."""
        if uid not in self._position:
            return []
        return self.order[:self._position[uid]][::-1]
