"""The node's one-CRIU-at-a-time lock, with stopping dumps served first.

A preemption or drain dump must finish inside Slurm's GraceTime; a user's periodic or
manual dumps (or several of their jobs' restores) queued on the same lock must not make
it wait behind them. Waiters that ask for `urgent` are woken before any ordinary one;
among equals, first come first served.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)

WAIT_REPORT = 10.0  # seconds a waiter waits before the log says who holds the gate


class CriuGate:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._queue: list[tuple[int, int]] = []  # (0 urgent / 1 ordinary, ticket), sorted
        self._tickets = itertools.count()
        self._holder = ("", 0.0)  # what holds the gate, since when (monotonic)

    def urgent_waiting(self) -> bool:
        """Whether a stopping dump waits for the gate now."""
        with self._cond:
            return bool(self._queue) and self._queue[0][0] == 0

    @contextmanager
    def hold(self, *, urgent: bool = False, what: str = "") -> Iterator[None]:
        """Run the body with the gate held; urgent waiters go ahead of ordinary ones.
        `what` names the holder in the log line of a waiter that waits WAIT_REPORT seconds
        (a gate that is never given back must be seen, not guessed)."""
        me = (0 if urgent else 1, next(self._tickets))
        started, reported = time.monotonic(), False
        with self._cond:
            self._queue.append(me)
            self._queue.sort()
            while self._busy or self._queue[0] != me:
                self._cond.wait(WAIT_REPORT)
                waited = time.monotonic() - started
                if waited >= WAIT_REPORT and not reported and self._busy:
                    holder, since = self._holder
                    log.warning("%s has waited %.0f s for CRIU, held by %s for %.0f s",
                                what or "a CRIU run", waited, holder or "a CRIU run",
                                time.monotonic() - since)
                    reported = True
            self._queue.pop(0)
            self._busy = True
            self._holder = (what, time.monotonic())
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
