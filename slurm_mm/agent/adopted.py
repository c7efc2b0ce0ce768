"""Processes a restarted node agent takes over: not its children, so it waits on pidfds
and learns their end from the status files they write (agent/job_records.py).

Runs as root. Trusts only its own records, re-checked against the kernel (start times).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from dataclasses import dataclass, field

from slurm_mm.agent import job_records
from slurm_mm.engine.proctree import tree_pids

log = logging.getLogger(__name__)
LOST_STATUS = 1  # the tree ended and left no status: never read as success


@dataclass
class AdoptedTree:
    """A job tree this agent did not start: not its child, so it waits on pidfds."""

    init_pid: int
    waiter_pid: int
    records: job_records.JobRecords
    job_id: str
    waiter_fd: int | None  # pidfd of the process whose end is the job's end; None: ended
    init_fd: int | None
    files_report: list[str] = field(default_factory=list)
    gpu_suspended: list[int] = field(default_factory=list)
    key: str = ""  # whose status file: the job's (""), or one of its steps' processes
    _status: int | None = None

    @classmethod
    def of(cls, record: job_records.TreeRecord, records: job_records.JobRecords) -> AdoptedTree:
        return cls.of_pids(record.job_id, records, record.init_pid, record.init_start,
                           record.waiter_pid, record.waiter_start)

    @classmethod
    def of_pids(cls, job_id: str, records: job_records.JobRecords, init_pid: int, init_start: int,
                waiter_pid: int, waiter_start: int, key: str = "") -> AdoptedTree:
        return cls(init_pid, waiter_pid, records, job_id, _pidfd(waiter_pid, waiter_start),
                   _pidfd(init_pid, init_start), key=key)

    @property
    def pid(self) -> int:  # as a Popen's, for an adopted srun keeper
        return self.waiter_pid

    def _ended(self, timeout: float | None) -> bool:
        if self.waiter_fd is None:
            return True
        ready, _, _ = select.select([self.waiter_fd], [], [], timeout)
        return bool(ready)

    def _read_status(self) -> int:
        if self._status is None:
            for _ in range(20):  # mm-init writes before it exits; its last write may lag a little
                status = self.records.exit_status(self.job_id, self.key)
                if status is not None:
                    break
                time.sleep(0.05)
            else:
                log.warning("job %s: its tree %sended without writing a status", self.job_id,
                            f"({self.key}) " if self.key else "")
                status = LOST_STATUS
            self._status = status
            for fd in (self.waiter_fd, self.init_fd):
                if fd is not None:
                    os.close(fd)
            self.waiter_fd = self.init_fd = None
        return self._status

    def poll(self) -> int | None:
        return self._read_status() if self._status is not None or self._ended(0) else None

    def wait(self, timeout: float | None = None) -> int:
        if self._status is None and not self._ended(timeout):
            raise TimeoutError(f"adopted job (pid {self.init_pid}) still running after {timeout} s")
        return self._read_status()

    def signal(self, sig: int) -> None:
        if self.init_fd is not None and self._status is None:
            try:
                signal.pidfd_send_signal(self.init_fd, sig)
            except (ProcessLookupError, OSError):
                pass

    def kill(self) -> None:
        self.signal(signal.SIGKILL)


def continue_stopped(init_pid: int) -> list[int]:
    """Continue processes of the tree left stopped (not traced: a CRIU still at work on
    it finishes on its own). Returns the PIDs continued."""
    continued = []
    for pid in tree_pids(init_pid):
        try:
            with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if fields.get("State", "").strip().startswith("T") and fields.get("TracerPid", "0").strip() == "0":
            try:
                os.kill(pid, signal.SIGCONT)
                continued.append(pid)
            except ProcessLookupError:
                pass
    return continued


def _pidfd(pid: int, started: int) -> int | None:
    """A pidfd of the process that started at `started` (None: gone, or its PID reused)."""
    if not job_records.same_process(pid, started):
        return None
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    if not job_records.same_process(pid, started):  # reused between check and open
        os.close(fd)
        return None
    return fd
