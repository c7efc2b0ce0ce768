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

_BATCH_STEP = re.compile(r"/job_(\d+)/step_batch(?:/|$)")


def batch_step_job(pid: int, node: str) -> str | None:
    """Job id whose batch step `pid` belongs to on `node`, per the kernel's cgroup record."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        m = _BATCH_STEP.search(path)
        # Multiple-slurmd test nodes name their cgroup root slurm_<node>; one-slurmd
        # nodes use /slurm/ (v1) or a systemd scope (v2).
        if m and (f"/slurm_{node}/" in path or "/slurm/" in path or "slurmstepd.scope" in path):
            return m.group(1)
    return None


def authorize_batch_step(peer_pid: int, peer_uid: int, job_id: str, node: str,
                         slurm: SlurmClient) -> Job:
    """The peer is job `job_id`'s batch task on this node, run by the job's owner."""
    if not job_id.isdigit():
        raise PermissionDenied(f"invalid job id {job_id[:32]!r}")
    in_cgroup = batch_step_job(peer_pid, node)
    if in_cgroup != job_id:
        raise PermissionDenied(f"process {peer_pid} is not the batch step of job {job_id} on {node}")
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
