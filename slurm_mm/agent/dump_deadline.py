"""How long one criu dump may run before it is killed.

A preemption dump is worth something only until the partition's GraceTime ends (Slurm
then kills the job and requeues it; it resumes from its last periodic image), and while
criu runs it holds the node's one CRIU gate: a dump that hangs (a file on a FUSE or
dead NFS mount) must not hold it past that point, or the next job's preemption and the
requeued job's restore wait behind it. So a preempted job's dump gets the time left
until its grace ends (at least FLOOR seconds), counted once it holds the gate; every
other dump gets `timeouts.checkpoint`. On a timeout criu is killed, the dump fails, the
job's earlier images stay, and a job that was not stopping runs on.

Trusts only slurmctld's record of the job (preempt time, partition GraceTime).
"""

from __future__ import annotations

import logging
import time
from slurm_mm.errors import SlurmMMError
from slurm_mm.slurm.model import SlurmClient

log = logging.getLogger(__name__)

FLOOR = 5.0  # seconds any dump gets, even one that starts with its grace already used up
MARGIN = 1.0  # seconds before grace ends at which criu is killed


def grace_end(slurm: SlurmClient, job_id: str) -> float | None:
    """Wall-clock time the preempted job's grace ends (slurmctld's preempt time + the
    partition's GraceTime); None when Slurm does not say."""
    grace_time = getattr(slurm, "grace_time", None)
    if grace_time is None:
        return None
    try:
        job = slurm.job(job_id)
        grace = grace_time(job.partition)
    except (SlurmMMError, OSError, ValueError) as exc:
        log.warning("job %s: cannot read its GraceTime (%s): its dump gets the configured timeout", job_id, exc)
        return None
    return float(job.preempt_time + grace) if grace > 0 and job.preempt_time > 0 else None


def timeout(deadline: float | None, configured: float, now: float | None = None) -> float:
    """Seconds a dump may take from now: up to `deadline` (at least FLOOR), never more than configured."""
    if deadline is None:
        return configured
    left = deadline - (time.time() if now is None else now) - MARGIN
    return min(configured, max(FLOOR, left))
