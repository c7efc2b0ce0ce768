"""What a node agent keeps on disk about its running jobs, so that a restarted (or
upgraded) agent can take them over instead of failing them.

One root-only directory per node, `<run_dir>/jobs/<node>/`, holds per job:
- `<job>.json`: the job's tree (namespace init and the process that waits for it, each
  with its kernel start time, so a reused PID is never mistaken for the job), the run's
  epoch, how it started and its last image. Written whole to a temporary name, fsynced
  and renamed: a reader sees the old record or the new one, never a mix.
- `<job>.status`: the job's exit code, written by mm-init (the launching `mm-init` or
  the `mm-init --keep` of a restored tree) when the job ends. The agent is the parent of
  those processes only until it restarts; after that, this file is how it learns the end.
- `<job>.<key>.status`: the same for the job's `srun` steps (agent/step_adopt.py): each
  step's srun keeper (`srun-<token>`) and each step task's tree (`step-<token>-<rank>`).
A job's files go when its tree ends; an agent starting sweeps those of jobs slurmctld no
longer runs here (agent/record_sweep.py).

Runs as root. Trusts only files in its own root-owned directory; never follows a link.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


@dataclass
class TreeRecord:
    """A running job's tree as a restarted agent needs it."""

    job_id: str
    uid: int
    epoch: int
    mode: str
    init_pid: int
    init_start: int  # /proc/<pid>/stat starttime (clock ticks since boot)
    waiter_pid: int  # the job's end is this process's end (mm-init, or mm-init --keep)
    waiter_start: int
    last_image: dict[str, Any] = field(default_factory=dict)
    stopping: str = ""  # a stopping checkpoint (preempt, drain) under way: its trigger
    steps: dict[str, Any] = field(default_factory=dict)  # token -> the step as step_adopt needs it


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None: no such process)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    try:
        return int(text[text.rindex(")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def same_process(pid: int, started: int) -> bool:
    """Whether `pid` is still the process that started at `started` (not a reused PID)."""
    return pid > 0 and start_time(pid) == started


_KEY = re.compile(r"[a-z0-9-]{1,64}")
MAX_RECORD = 16 << 20  # a record holds its steps' environments


class JobRecords:
    """The record directory of one node's agent."""

    def __init__(self, run_dir: Path, node: str) -> None:
        self.dir = Path(run_dir) / "jobs" / node
        self.lock = threading.RLock()  # a record is read, changed and written whole

    def _ensure_dir(self) -> Path:
        self.dir.parent.parent.mkdir(mode=0o755, parents=True, exist_ok=True)  # run_dir
        for path in (self.dir.parent, self.dir):
            try:
                path.mkdir(mode=0o700)
            except FileExistsError:
                pass
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
                raise OSError(f"{path} is not a root-owned directory")
            if st.st_mode & 0o077:
                os.chmod(path, 0o700)
        return self.dir

    def _path(self, job_id: str, suffix: str) -> Path:
        if not job_id.isdigit():
            raise ValueError(f"invalid job id {job_id!r}")
        return self.dir / f"{job_id}{suffix}"

    @staticmethod
    def _status_suffix(key: str) -> str:
        if key and not _KEY.fullmatch(key):
            raise ValueError(f"invalid status key {key!r}")
        return f".{key}.status" if key else ".status"

    def status_fd(self, job_id: str, key: str = "") -> int:
        """A fresh, empty status file of the job (`key`: of one of its steps' processes),
        open for mm-init (or the srun keeper) to write its end."""
        self._ensure_dir()
        return os.open(self._path(job_id, self._status_suffix(key)),
                       os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    def exit_status(self, job_id: str, key: str = "") -> int | None:
        """The exit code written when the job (or its process `key`) ended (None: none written)."""
        try:
            fd = os.open(self._path(job_id, self._status_suffix(key)), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (OSError, ValueError):
            return None
        try:
            text = os.read(fd, 32).decode("ascii", errors="replace").strip()
        finally:
            os.close(fd)
        return int(text) if text.isdigit() and len(text) <= 3 else None

    def remove_status(self, job_id: str, key: str) -> None:
        """A step's process ended and was reported: its status file goes."""
        try:
            self._path(job_id, self._status_suffix(key)).unlink()
        except (OSError, ValueError):
            pass

    def job_ids(self) -> set[str]:
        """Jobs with any file here."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return set()
        return {name.split(".", 1)[0] for name in names if name.split(".", 1)[0].isdigit()}

    def save(self, record: TreeRecord) -> None:
        directory = self._ensure_dir()
        final = self._path(record.job_id, ".json")
        tmp = directory / f".{record.job_id}.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            data = memoryview(json.dumps(asdict(record)).encode())
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def load(self, job_id: str) -> TreeRecord | None:
        try:
            fd = os.open(self._path(job_id, ".json"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (OSError, ValueError):
            return None
        try:
            with os.fdopen(fd, "rb") as f:
                data = json.loads(f.read(MAX_RECORD))
            return TreeRecord(**data)
        except (OSError, ValueError, TypeError) as exc:
            log.warning("job %s: unreadable record: %s", job_id, exc)
            return None

    def remove(self, job_id: str) -> None:
        """Every file of the job: its record, its status and its steps' statuses."""
        if not job_id.isdigit():
            return
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        for name in names:
            if name.split(".", 1)[0] == job_id or name == f".{job_id}.json.tmp":
                try:
                    (self.dir / name).unlink()
                except OSError:
                    pass


class _Tree(Protocol):
    init_pid: int


class _Owner(Protocol):
    uid: int


class _State(Protocol):
    mode: str
    last_image: dict[str, Any]


class RecordedJob(Protocol):
    """What a record is made of: a job supervisor's job, run, state and tree."""

    job_id: str
    epoch: int
    req: _Owner
    record: _State
    tree: _Tree | None


def tree_record(sup: RecordedJob, stopping: str = "") -> TreeRecord | None:
    """The record of a job supervisor's running tree (None: it has no tree to record)."""
    tree = sup.tree
    if tree is None:
        return None
    pids = tree_pids_of(tree)
    if pids is None:
        return None
    jobsteps = getattr(getattr(sup, "steps", None), "jobsteps", None)  # agent/steps.py StepGuard
    steps = jobsteps.persisted() if jobsteps is not None else {}
    return TreeRecord(job_id=sup.job_id, uid=sup.req.uid, epoch=sup.epoch, mode=sup.record.mode or "launched",
                      init_pid=pids[0], init_start=pids[1], waiter_pid=pids[2], waiter_start=pids[3],
                      last_image=dict(sup.record.last_image), stopping=stopping, steps=steps)


def tree_pids_of(tree: Any) -> tuple[int, int, int, int] | None:
    """A running tree's (init pid, its start, waiter pid, its start); None: not running."""
    waiter = getattr(tree, "waiter_pid", None) or getattr(tree, "outer_pid", None)
    init_start, waiter_start = start_time(tree.init_pid), start_time(waiter) if waiter else None
    if not waiter or init_start is None or waiter_start is None:
        return None
    return tree.init_pid, init_start, waiter, waiter_start


def save(records: JobRecords | None, sup: RecordedJob, stopping: str | None = "") -> None:
    """Record the supervisor's job (best effort: a job runs on if its record cannot be
    written; it just cannot outlive an agent restart). `stopping`: the trigger of a
    stopping checkpoint that starts now (its dump ends the tree); None: an update of the
    recorded job (its steps), keeping that, and nothing written when no record is left."""
    if records is None:
        return
    try:
        with records.lock:
            if stopping is None:
                earlier = records.load(sup.job_id)
                if earlier is None:
                    return
                stopping = earlier.stopping
            record = tree_record(sup, stopping)
            if record is not None:
                records.save(record)
    except (OSError, ValueError) as exc:
        log.warning("job %s: cannot record its tree (%s): an agent restart would lose it", sup.job_id, exc)


def forget(records: JobRecords | None, job_id: str) -> None:
    """The job's tree is over on this node: nothing of it is left to take over."""
    if records is not None:
        with records.lock:
            records.remove(job_id)
