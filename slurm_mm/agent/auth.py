"""Who may ask the agent for what, decided from the kernel and Slurm only.

Trusts: SO_PEERCRED (pid/uid of the peer), /proc/PID/cgroup (written by the kernel;
Slurm places a batch step's task in .../job_<id>/step_batch), and slurmctld's record
of the job. Never trusts the peer's message, environment or files.
"""

from __future__ import annotations

import re
from pathlib import Path

from slurm_mm.errors import PermissionDenied
from slurm_mm.slurm.client import Job, SlurmClient

# Where Slurm's cgroup plugins put a batch step: cgroup v1 hierarchies below /slurm/
# (/slurm_<node>/ with several slurmds on one host), cgroup v2 below slurmd's scope
# (<node>_slurmstepd.scope likewise). Anchored at the hierarchy's root: on cgroup v2 a
# user may own a delegated subtree and name directories in it as they like.
_V1_BATCH = re.compile(r"^/slurm(?:_(?P<node>[^/]+))?/(?:uid_\d+/)?job_(?P<job>\d+)/step_batch(?:/|$)")
_V2_BATCH = re.compile(r"^/system\.slice/(?:(?P<node>[^/]+)_)?slurmstepd\.scope/job_(?P<job>\d+)/step_batch(?:/|$)")


def batch_step_job(pid: int, node: str) -> str | None:
    """Job id whose batch step `pid` belongs to on `node`, per the kernel's cgroup record."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        hierarchy, _, path = line.partition(":")[2].partition(":")
        m = (_V2_BATCH if hierarchy == "" and line.startswith("0:") else _V1_BATCH).match(path)
        if m and m.group("node") in (None, node):
            return m.group("job")
    return None


def check_batch_step(peer_pid: int, job_id: str, node: str) -> None:
    """The kernel places the peer in job `job_id`'s batch step on this node (cheap: /proc only)."""
    if not job_id.isdigit():
        raise PermissionDenied(f"invalid job id {job_id[:32]!r}")
    if batch_step_job(peer_pid, node) != job_id:
        raise PermissionDenied(f"process {peer_pid} is not the batch step of job {job_id} on {node}")


def authorize_batch_step(peer_pid: int, peer_uid: int, job_id: str, node: str,
                         slurm: SlurmClient) -> Job:
    """The peer is job `job_id`'s batch task on this node, run by the job's owner."""
    check_batch_step(peer_pid, job_id, node)
    job = slurm.job(job_id)
    if job.user_id != peer_uid:
        raise PermissionDenied(f"job {job_id} belongs to uid {job.user_id}, not {peer_uid}")
    if job.batch_host != node:
        raise PermissionDenied(f"job {job_id} runs on {job.batch_host}, not {node}")
    return job


def authorize_owner_or_root(peer_uid: int, job: Job) -> None:
    """Checkpoint/requeue requests: the job's owner or root, nobody else."""
    if peer_uid not in (0, job.user_id):
        raise PermissionDenied(f"uid {peer_uid} may not act on job {job.job_id} of uid {job.user_id}")
