"""CPU and I/O priority of the store's own worker threads.

A periodic checkpoint is committed while the job runs on: its compression, hashing and
writes must take only what the job leaves idle. Linux applies nice values, scheduling
policies and I/O priorities per thread, so the store lowers its worker threads, never the
caller's thread or the process, and the threads end with the commit. hurry() lets a
waiting, more urgent checkpoint (preemption) lift them back to normal mid-commit.
A background commit can also be kept off the CPUs the jobs run on (`cpus`): SCHED_IDLE
alone still costs a job on a 2-vCPU VM 10-20% (the scheduler moves work between the
CPUs; measured), while the same commit on a CPU of its own cost it 0-3%. At most one
encoding thread per such CPU runs at a time, so a commit never queues more CPU work than
the CPUs it was given. Never raises: a refused priority change only costs the job some speed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading
import time

log = logging.getLogger(__name__)

NICE_BACKGROUND = 19
# ioprio_set(2): who = IOPRIO_WHO_PROCESS (a thread id on Linux), class << 13 | data.
_IOPRIO_WHO_PROCESS = 1
_IOPRIO_CLASS_BE = 2
_IOPRIO_CLASS_SHIFT = 13
_SYS_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "ppc64le": 273}.get(platform.machine())

_libc = ctypes.CDLL(None, use_errno=True)
_BURST = 0.05  # CPU seconds a paced commit may run ahead of its budget


def _ioprio(value: int) -> None:
    if _SYS_IOPRIO_SET is None:
        return
    if _libc.syscall(_SYS_IOPRIO_SET, _IOPRIO_WHO_PROCESS, threading.get_native_id(), value) != 0:
        log.debug("ioprio_set refused: %s", os.strerror(ctypes.get_errno()))


def lower_this_thread() -> None:
    """Run the calling thread as background work: SCHED_IDLE (CPU time only when no other
    thread wants it) and the lowest best-effort I/O priority (the idle class
    could starve it on a busy disk)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread
    except (OSError, AttributeError):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE_BACKGROUND)
        except OSError as exc:
            log.debug("cannot lower thread priority: %s", exc)
    _ioprio((_IOPRIO_CLASS_BE << _IOPRIO_CLASS_SHIFT) | 7)


def raise_this_thread() -> None:
    """Back to normal scheduling (needs CAP_SYS_NICE to undo a nice value; root has it)."""
    try:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 0)
    except (OSError, AttributeError) as exc:
        log.debug("cannot raise thread priority: %s", exc)
    _ioprio((_IOPRIO_CLASS_BE << _IOPRIO_CLASS_SHIFT) | 4)


class Priority:
    """The priority one commit's threads should run at; background until hurried.

    cpu_share: in the background, the CPU time all threads of the commit together may use
    per second of wall time (None: no limit). SCHED_IDLE alone still costs a job on the
    other CPU some speed (measured on a 2-vCPU VM: 8-18% for a pure spinner, about 20% for
    a commit), so background commits can also be paced: spend() makes the thread that
    overdrew the budget sleep until it is paid back."""

    def __init__(self, background: bool, cpu_share: float | None = None,
                 cpus: frozenset[int] | None = None) -> None:
        """cpus: where a background commit's threads run (None or empty: anywhere);
        hurry() lets them run anywhere again."""
        self._background = background
        self._hurried = threading.Event()
        self.cpus = frozenset(cpus) if background and cpus else None
        self._all_cpus = _allowed_cpus() if self.cpus else None
        self._slots = threading.Semaphore(len(self.cpus)) if self.cpus else None
        self._share = cpu_share
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._spent = 0.0

    def spend(self, cpu_seconds: float) -> None:
        """Account CPU time a thread of the commit just used; sleep if over the budget."""
        if not self.background or not self._share or cpu_seconds <= 0:
            return
        with self._lock:
            self._spent += cpu_seconds
            due = self._start + (self._spent - _BURST) / self._share
        wait = due - time.monotonic()
        while wait > 0 and self.background:
            self._hurried.wait(min(wait, 0.5))
            wait = due - time.monotonic()

    @property
    def background(self) -> bool:
        return self._background and not self._hurried.is_set()

    def hurry(self) -> None:
        if not self._hurried.is_set():
            self._hurried.set()
            if self._slots is not None:
                for _ in range(_MAX_SLOTS):  # no limit on encoding threads from now on
                    self._slots.release()

    def enter(self) -> None:
        """Called by each worker thread when it starts."""
        if self.background:
            lower_this_thread()
            if self.cpus:
                _set_cpus(self.cpus)

    def check(self, lowered: bool) -> bool:
        """Called by a worker between chunks with whether it runs lowered; returns the new
        state (raised once hurry() was called)."""
        if lowered and not self.background:
            raise_this_thread()
            if self._all_cpus:
                _set_cpus(self._all_cpus)
            return False
        return lowered

    def slot(self) -> "_Slot":
        """Held by an encoding thread while it works on a chunk (see the module's doc)."""
        return _Slot(self._slots if self.background else None)


_MAX_SLOTS = 1024


class _Slot:
    def __init__(self, sem: threading.Semaphore | None) -> None:
        self._sem = sem

    def __enter__(self) -> None:
        if self._sem is not None:
            self._sem.acquire()

    def __exit__(self, *exc: object) -> None:
        if self._sem is not None:
            self._sem.release()


def _allowed_cpus() -> frozenset[int]:
    try:
        return frozenset(os.sched_getaffinity(0))
    except OSError:
        return frozenset(range(os.cpu_count() or 1))


def _set_cpus(cpus: frozenset[int]) -> None:
    try:
        os.sched_setaffinity(0, cpus)  # 0: this thread
    except OSError as exc:
        log.debug("cannot move thread to CPUs %s: %s", sorted(cpus), exc)
