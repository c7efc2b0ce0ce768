"""How long one criu dump may run before it is killed.

A preemption dump is worth something only until the partition's GraceTime ends (Slurm
then kills the job and requeues it; it resumes from its last periodic image), and while
criu runs it holds the node's one CRIU gate: a dump that hangs (a file on a FUSE or
dead NFS mount) must not hold it past that point, or the next job's preemption and the
requeued job's restore wait behind it. So a preempted job's dump gets the time left
until its grace ends (at least FLOOR seconds); every other dump gets
`timeouts.checkpoint`. On a timeout criu is killed, the dump fails, the job's earlier
images stay, and a job that was not stopping runs on.

Trusts only slurmctld's record of the job (preempt time, partition GraceTime).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any

from slurm_mm.errors import SlurmMMError

log = logging.getLogger(__name__)

FLOOR = 5.0  # seconds any dump gets, even one that starts with its grace already used up
MARGIN = 1.0  # seconds before grace ends at which criu is killed

_lock = threading.Lock()
# A job run's tree -> wall-clock time its grace ends (gone with the tree).
_deadlines: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


def note_preemption(slurm: Any, supervisor: Any) -> None:
    """Remember when the grace of `supervisor`'s preempted job ends (from slurmctld)."""
    tree = getattr(supervisor, "tree", None)
    grace_time = getattr(slurm, "grace_time", None)
    if tree is None or grace_time is None:
        return
    try:
        job = slurm.job(supervisor.job_id)
        grace = grace_time(job.partition)
    except (SlurmMMError, OSError, ValueError) as exc:
        log.warning("job %s: cannot read its GraceTime (%s): its dump gets the configured timeout",
                    supervisor.job_id, exc)
        return
    if grace > 0 and job.preempt_time > 0:
        with _lock:
            _deadlines[tree] = job.preempt_time + grace


def timeout(tree: Any, configured: float, now: float | None = None) -> float:
    """Seconds the next dump of `tree` may take."""
    with _lock:
        try:
            deadline = _deadlines.get(tree)
        except TypeError:  # not weak-referenceable: no deadline was noted for it
            deadline = None
    if deadline is None:
        return configured
    left = deadline - (time.time() if now is None else now) - MARGIN
    return min(configured, max(FLOOR, left))
