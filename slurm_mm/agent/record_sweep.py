"""At agent start: drop what earlier agents recorded for jobs that no longer run here.

A job's records (agent/job_records.py) and its steps' exit files go when its tree ends;
an agent that was down (or crashed) when a job ended leaves them behind. The agent asks
slurmctld which jobs run on this node and removes the rest. When slurmctld cannot be
asked, nothing is removed: a record of a running job is what lets it be taken over.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from slurm_mm.agent.job_records import JobRecords
from slurm_mm.errors import SlurmMMError
from slurm_mm.slurm.model import SlurmClient

log = logging.getLogger(__name__)
# Base states of a job that may still have a tree on its batch host.
ALIVE = frozenset({"RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "STOPPED", "SIGNALING",
                   "RESIZING", "REQUEUED"})


def sweep(records: JobRecords, slurm: SlurmClient, node: str, steps_dir: Path) -> list[str]:
    """Remove the records (and step exit files under `steps_dir`) of jobs slurmctld does
    not run on `node`; the job ids removed."""
    recorded = records.job_ids() | _step_dirs(steps_dir)
    if not recorded:
        return []
    try:
        here = {job.job_id for job in slurm.jobs(node) if job.state.upper() in ALIVE}
    except SlurmMMError as exc:
        log.warning("cannot ask slurmctld which jobs run here (%s): keeping the job records of %s",
                    exc, ", ".join(sorted(recorded)))
        return []
    gone = sorted(recorded - here, key=int)
    for job_id in gone:
        records.remove(job_id)
        shutil.rmtree(steps_dir / job_id, ignore_errors=True)
    if gone:
        log.info("removed the records of job(s) %s: they no longer run on %s", ", ".join(gone), node)
    return gone


def _step_dirs(steps_dir: Path) -> set[str]:
    try:
        return {p.name for p in steps_dir.iterdir() if p.name.isdigit() and not p.is_symlink()}
    except OSError:
        return set()
