"""Which Slurm runs here, and the behaviours slurm_mm must follow that differ by version.

Knows Slurm's commands and release history, never CRIU or images.
"""

from __future__ import annotations

import functools
import re
import subprocess

from slurm_mm.errors import SlurmError
from slurm_mm.slurm.model import COMMAND_TIMEOUT

VERSION_COMMANDS = (("slurmd", "-V"), ("sinfo", "-V"), ("scontrol", "-V"))
# From 24.05 on, slurmctld marks a job it signalled at the start of a preemption grace
# time and requeues it as PREEMPTED when its batch script ends within that time. The
# mark is cleared only by that requeue: after a `scontrol requeue` during the grace
# time it stays, and the job's NEXT run is requeued once more when it completes.
REQUEUES_JOB_ENDING_IN_GRACE = (24, 5)


def major_minor(text: str) -> tuple[int, int] | None:
    """(25, 5) from "slurm 25.05.1", "slurm-wlm 22.05.8" or pyslurm's "25.5.0"."""
    m = re.search(r"(\d+)\.(\d+)(?:\.\d+)?", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def running_slurm_version() -> str:
    """The version of the Slurm installed here, from the first command that tells it."""
    for argv in VERSION_COMMANDS:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
        except (OSError, subprocess.SubprocessError):
            continue
        for line in proc.stdout.splitlines():
            if line.startswith("slurm") and major_minor(line):
                return line.strip()
    raise SlurmError("cannot tell the running Slurm's version (slurmd -V, sinfo -V, scontrol -V)")


def requeues_job_ending_in_grace(version: str) -> bool:
    """Whether this Slurm requeues, by itself, a job that ends during its preemption grace
    time (PreemptMode=REQUEUE): then slurm_mm must let the job end, not requeue it."""
    found = major_minor(version)
    return found is not None and found >= REQUEUES_JOB_ENDING_IN_GRACE


@functools.lru_cache(maxsize=1)
def slurm_requeues_preempted_job_on_exit() -> bool:
    """requeues_job_ending_in_grace() for the Slurm installed here (asked once). When
    the version cannot be told: False (requeue it ourselves, as every Slurm accepts)."""
    try:
        return requeues_job_ending_in_grace(running_slurm_version())
    except SlurmError:
        return False
