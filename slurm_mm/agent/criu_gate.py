"""The node's one-CRIU-at-a-time lock, with stopping dumps served first.

A preemption or drain dump must finish inside Slurm's GraceTime; a user's periodic or
manual dumps (or several of their jobs' restores) queued on the same lock must not make
it wait behind them. Waiters that ask for `urgent` are woken before any ordinary one;
among equals, first come first served.
"""

from __future__ import annotations

import itertools
import threading
from contextlib import contextmanager
from typing import Iterator


class CriuGate:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._queue: list[tuple[int, int]] = []  # (0 urgent / 1 ordinary, ticket), sorted
        self._tickets = itertools.count()

    def urgent_waiting(self) -> bool:
        """Whether a stopping dump waits for the gate now."""
        with self._cond:
            return bool(self._queue) and self._queue[0][0] == 0

    @contextmanager
    def hold(self, *, urgent: bool = False) -> Iterator[None]:
        """Run the body with the gate held; urgent waiters go ahead of ordinary ones."""
        me = (0 if urgent else 1, next(self._tickets))
        with self._cond:
            self._queue.append(me)
            self._queue.sort()
            while self._busy or self._queue[0] != me:
                self._cond.wait()
            self._queue.pop(0)
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
