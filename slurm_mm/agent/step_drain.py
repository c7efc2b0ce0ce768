"""Step output in flight between a step's tasks and the batch tree: wait until it has landed.

What a step task writes to its stdout/stderr travels task -> pipe -> slurmstepd -> the
real `srun` (run by the agent, outside every image) -> the stand-in's fds in the batch
tree (a pipe into the script's own program, a file, the job's output). A checkpoint
dumps the step tasks before the batch tree; every byte a task's image counts as written
must have reached the batch side before the batch tree is dumped, or it is in neither
image and the restored stream has a hole.
- A stopping dump ends the tasks: the real `srun` writes out all they wrote, then exits
  (`unfinished`).
- A periodic dump leaves the tasks stopped: their output pipes are empty, srun's I/O
  counters stand still and its destination pipes have room, so srun holds nothing back
  (`in_flight`).

Trusts /proc of processes the agent itself started. Reads only: never writes to a pipe.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import subprocess
import termios
import time

F_GETPIPE_SZ = 1032
PAGE = 4096
POLL_SECONDS = 0.05
STILL_SECONDS = 0.15  # srun's I/O counters unchanged this long: nothing more is coming


def pipe_bytes(fd: int) -> int:
    """Bytes waiting in the pipe `fd` is an end of (0 for anything that is not a pipe)."""
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return 0
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def _io_counters(pid: int) -> tuple[int, int] | None:
    """rchar and wchar of `pid` (every read and write, sockets and pipes included)."""
    try:
        with open(f"/proc/{pid}/io", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        return int(fields["rchar"]), int(fields["wchar"])
    except (OSError, KeyError, ValueError):
        return None


def _full_pipe(pid: int) -> int | None:
    """The first of fds 1-2 of `pid` that is a pipe too full to take another page."""
    for fd in (1, 2):
        try:
            handle = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if not stat.S_ISFIFO(os.fstat(handle).st_mode):
                continue
            size = fcntl.fcntl(handle, F_GETPIPE_SZ)
            if pipe_bytes(handle) + PAGE > size:
                return fd
        except OSError:
            continue
        finally:
            os.close(handle)
    return None


def unfinished(procs: list[subprocess.Popen], seconds: float) -> list[subprocess.Popen]:
    """Waits up to `seconds` for each of `procs` to exit; those still running."""
    deadline = time.monotonic() + seconds
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    return [proc for proc in procs if proc.poll() is None]


def in_flight(task_fds: list[int], srun_pids: list[int], seconds: float) -> str | None:
    """Waits up to `seconds` for the output of stopped tasks to land; what still moves, or None."""
    deadline = time.monotonic() + seconds
    last: dict[int, tuple[int, int] | None] = {}
    still_since = time.monotonic()
    while True:
        why = _moving(task_fds, srun_pids, last)
        now = time.monotonic()
        if why is not None:
            still_since = now
        elif now - still_since >= STILL_SECONDS:
            return None
        if now >= deadline:
            return why or "srun was still moving output"
        time.sleep(POLL_SECONDS)


def _moving(task_fds: list[int], srun_pids: list[int], last: dict[int, tuple[int, int] | None]) -> str | None:
    for fd in task_fds:
        waiting = pipe_bytes(fd)
        if waiting:
            return f"{waiting} bytes of a task's output wait in its pipe"
    why = None
    for pid in srun_pids:
        counters = _io_counters(pid)
        if pid in last and counters != last[pid]:
            why = why or f"srun (pid {pid}) is still moving output"
        last[pid] = counters
        full = _full_pipe(pid)
        if full is not None:
            why = why or f"the pipe srun (pid {pid}) writes its fd {full} to is full"
    return why
