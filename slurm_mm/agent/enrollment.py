"""Which jobs the node agent may serve: enrolled ones, each run started once.

A job is enrolled when it was submitted with `--checkpoint-interval`: the SPANK plugin
records that in the job's control environment in sbatch, slurmctld keeps it, and the
Prolog (root, run by slurmd before the batch step) sees it as SPANK_SLURM_MM_INTERVAL
and leaves a root-owned marker here. Anything a job's user could set (the job's own
environment, a hand-run `slurm-mm-run`) never enrols a job: the agent looks only at the
marker. A `start` claims the job's run (restart count) with a second marker, so one run
is started at most once even across an agent restart. When the agent itself requeues
the job it leaves a third marker, so the Epilog keeps the images whatever Slurm's counts
say. The Epilog removes all three.

Markers live in `run_dir` (root's, not writable by others), one directory per kind,
0700; file names are `<job id>@<node>` (several slurmd may share a host and run_dir).
Must never follow a link or trust a marker it did not find root-owned.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from slurm_mm.config import Config
from slurm_mm.errors import NotEnrolled, PermissionDenied
from slurm_mm.store.safe_fs import check_name

ENROLLED = "enrolled"
STARTED = "started"
REQUEUED = "requeued"  # the agent asked Slurm to requeue this run: its images are needed


def _name(job_id: str, node: str) -> str:
    check_name(job_id, kind="job id")
    check_name(node, kind="node name")
    if not job_id.isdigit():
        raise PermissionDenied(f"invalid job id {job_id[:32]!r}")
    return f"{job_id}@{node}"


def _dir(cfg: Config, kind: str, *, create: bool) -> int | None:
    """An fd on run_dir/<kind>, a root-owned 0700 directory (created when `create`)."""
    path = cfg.run_dir / kind
    if create:
        cfg.run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    st = os.fstat(fd)
    if st.st_uid != 0 or st.st_mode & 0o022:
        os.close(fd)
        raise PermissionDenied(f"{path} is not a root-owned directory only root can write")
    return fd


def _read(cfg: Config, kind: str, name: str) -> str | None:
    dfd = _dir(cfg, kind, create=False)
    if dfd is None:
        return None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except FileNotFoundError:
        return None
    finally:
        os.close(dfd)
    with os.fdopen(fd) as handle:
        st = os.fstat(handle.fileno())
        if st.st_uid != 0 or not stat.S_ISREG(st.st_mode):
            return None
        return handle.read(64)


def _write(cfg: Config, kind: str, name: str, text: str) -> None:
    dfd = _dir(cfg, kind, create=True)
    assert dfd is not None
    tmp = f".{name}.{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dfd)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    finally:
        os.close(dfd)


def mark_enrolled(cfg: Config, job_id: str, node: str, run: int, interval: str) -> None:
    """Prolog: run `run` (restart count) of job_id runs on node with checkpoints."""
    _write(cfg, ENROLLED, _name(job_id, node), f"{int(run)} {interval[:32]}\n")


def recorded_run(cfg: Config, job_id: str, node: str) -> int | None:
    """The restart count the Prolog saw for job_id on node, None without its marker."""
    text = _read(cfg, ENROLLED, _name(job_id, node))
    word = (text or "").split()[:1]
    return int(word[0]) if word and word[0].isdigit() else None


def check_enrolled(cfg: Config, job_id: str, node: str) -> None:
    """NotEnrolled unless the Prolog marked job_id enrolled on node."""
    if _read(cfg, ENROLLED, _name(job_id, node)) is None:
        raise NotEnrolled(f"job {job_id} is not enrolled on {node} (submit it with --checkpoint-interval; "
                          "the slurm_mm Prolog records that)")


def claim_start(cfg: Config, job_id: str, node: str, epoch: int) -> None:
    """Record that run `epoch` of job_id started on node; PermissionDenied if it already did."""
    name = _name(job_id, node)
    seen = _read(cfg, STARTED, name)
    if seen is not None and seen.strip().isdigit() and int(seen) >= epoch:
        raise PermissionDenied(f"job {job_id} (run {epoch}) was already started on {node}")
    _write(cfg, STARTED, name, f"{epoch}\n")


def mark_requeued(cfg: Config, job_id: str, node: str, epoch: int) -> None:
    """The agent is about to requeue run `epoch` of job_id: the Epilog must keep its images."""
    _write(cfg, REQUEUED, _name(job_id, node), f"{int(epoch)}\n")


def requeued_by_agent(cfg: Config, job_id: str, node: str) -> bool:
    return _read(cfg, REQUEUED, _name(job_id, node)) is not None


def forget(cfg: Config, job_id: str, node: str) -> None:
    """Epilog: the job left this node; its markers go (a requeued run's Prolog writes new ones)."""
    name = _name(job_id, node)
    for kind in (ENROLLED, STARTED, REQUEUED):
        dfd = _dir(cfg, kind, create=False)
        if dfd is None:
            continue
        try:
            os.unlink(name, dir_fd=dfd)
        except FileNotFoundError:
            pass
        finally:
            os.close(dfd)


def marker_path(cfg: Config, kind: str, job_id: str, node: str) -> Path:
    """Where a marker lives (for tests and admins)."""
    return cfg.run_dir / kind / _name(job_id, node)
