"""How many connections the node agent serves at once, per user and in all.

The agent's socket is open to every local user (SO_PEERCRED decides what a request
gets), so one user must not be able to use up the agent's threads or descriptors and
take every enrolled job of the node down with it. A connection holds a slot from
accept() until it is either done or authorised as a job's batch task (one per running
job, bounded by the jobs themselves). Root's connections are not counted: root can
stop the agent anyway, and `slurm-mm drain` must always get through.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

PER_UID = 16  # concurrent requests of one user (a manual checkpoint holds one while it runs)
TOTAL = 128  # concurrent requests of all users but root
REQUEST_SECONDS = 10.0  # a peer has this long to send its whole first request


class Slot:
    """One admitted connection; release() is idempotent."""

    def __init__(self, admission: Admission | None, uid: int) -> None:
        self._admission = admission
        self.uid = uid

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission._release(self.uid)


class Admission:
    def __init__(self, per_uid: int = PER_UID, total: int = TOTAL) -> None:
        self.per_uid = per_uid
        self.total = total
        self._lock = threading.Lock()
        self._by_uid: Counter[int] = Counter()
        self._refused_logged = 0.0

    def admit(self, uid: int) -> Slot | None:
        """A slot for a new connection of `uid`, or None when its share or the total is used up."""
        if uid == 0:
            return Slot(None, uid)
        with self._lock:
            if self._by_uid[uid] >= self.per_uid or sum(self._by_uid.values()) >= self.total:
                return None
            self._by_uid[uid] += 1
        return Slot(self, uid)

    def _release(self, uid: int) -> None:
        with self._lock:
            self._by_uid[uid] -= 1
            if self._by_uid[uid] <= 0:
                del self._by_uid[uid]

    def in_use(self, uid: int | None = None) -> int:
        with self._lock:
            return sum(self._by_uid.values()) if uid is None else self._by_uid[uid]

    def should_log_refusal(self, every: float = 10.0) -> bool:
        """Refusals are logged at most once per `every` seconds: a flood must not fill the log."""
        now = time.monotonic()
        with self._lock:
            if now - self._refused_logged < every:
                return False
            self._refused_logged = now
            return True
