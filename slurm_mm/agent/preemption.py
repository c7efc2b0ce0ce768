"""Is a job being preempted in a way that ends its run? Asked of Slurm, answered once per
partition for its PreemptMode.

Slurm's notice to a preempted job is a SIGTERM (or the `--signal` the user chose), which
looks like any other signal; what tells preemption apart is the job's `preempt_time`
set during this run. Only a REQUEUE/CANCEL preemption ends the tree and wants an image:
a SUSPEND keeps the processes (only GPU state moves out, on SIGTSTP).
"""

from __future__ import annotations

import logging
import threading

from slurm_mm.errors import SlurmMMError
from slurm_mm.slurm.model import Job, SlurmClient

log = logging.getLogger(__name__)


class Preemption:
    def __init__(self, slurm: SlurmClient) -> None:
        self.slurm = slurm
        self._modes: dict[str, str] = {}
        self._lock = threading.Lock()

    def ends_run(self, job: Job) -> bool:
        """`job` (as Slurm reports it now) was selected, during this run, for a preemption
        that ends the run."""
        if job.state != "RUNNING" or not (job.preempt_time > 0 and job.preempt_time >= job.start_time):
            return False
        mode = self.mode(job.partition)
        return "SUSPEND" not in mode and "GANG" not in mode

    def job_ends_run(self, job_id: str) -> bool:
        """ends_run() of the job as Slurm reports it now; False if Slurm cannot say."""
        try:
            return self.ends_run(self.slurm.job(job_id))
        except SlurmMMError as exc:
            log.warning("job %s: cannot ask Slurm whether it is being preempted: %s", job_id, exc)
            return False

    def mode(self, partition: str) -> str:
        with self._lock:
            mode = self._modes.get(partition)
        if mode is None:
            try:
                mode = self.slurm.preempt_mode(partition)
            except SlurmMMError:
                mode = "REQUEUE"  # the mode that needs an image: never miss one
            with self._lock:
                self._modes[partition] = mode
        return mode
