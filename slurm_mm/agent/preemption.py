"""Is THIS run of a job being preempted in a way that ends it? Asked of Slurm, answered
once per partition for its PreemptMode; and the notices the agent itself got.

Slurm's notice to a preempted job is a SIGTERM (or the `--signal` the user chose), which
looks like any other signal; what tells preemption apart is the job's record: RUNNING,
its restart count is the run's epoch, and `preempt_time` is set and not before this
run's `start_time` (Slurm clears both when it requeues a job: a record that still shows
them is of an earlier run). Only a REQUEUE/CANCEL preemption ends the tree and wants an
image: a SUSPEND keeps the processes (only GPU state moves out, on SIGTSTP).

A wrong "yes" is costly where an exit is reinterpreted (agent/steps.py): the agent would
requeue a job whose script merely failed (an owner's `scontrol requeue`, a failing
step), and a rerun failing the same way again, without end. There the record alone is
not enough: the agent must also have received a notice in this run (PreemptNotice).
"""

from __future__ import annotations

import logging
import threading
import time

from slurm_mm.errors import SlurmMMError
from slurm_mm.slurm.model import Job, SlurmClient

log = logging.getLogger(__name__)

ASK_TRIES = 3
ASK_PAUSE = 1.0  # seconds between tries


def selected_in_run(job: Job, epoch: int) -> bool:
    """slurmctld selected run `epoch` of `job` for preemption (any mode)."""
    return (job.state == "RUNNING" and job.restart_count == epoch and job.start_time > 0
            and job.preempt_time >= job.start_time)


class PreemptNotice:
    """The preemption notices the agent itself received during one run of a job: the
    batch task's relayed USR1/TERM, a step task's TERM, the watcher's poll (each counted
    only when Slurm's record says this run is being preempted)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.source = ""
        self.at = 0.0

    def saw(self, source: str) -> None:
        """Record a notice (the first one's source is kept)."""
        if not self._event.is_set():
            self.source, self.at = source, time.time()
            self._event.set()

    def seen(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        """A notice within `timeout` seconds: Slurm ends a preempted job's steps at the
        moment it signals the batch task, so the script's exit can beat the notice."""
        return self._event.wait(timeout)


class Preemption:
    def __init__(self, slurm: SlurmClient) -> None:
        self.slurm = slurm
        self._modes: dict[str, str] = {}
        self._lock = threading.Lock()

    def ends_run(self, job: Job, epoch: int) -> bool:
        """`job` (as Slurm reports it now) was selected, during its run `epoch`, for a
        preemption that ends the run."""
        if not selected_in_run(job, epoch):
            return False
        mode = self.mode(job.partition)
        return "SUSPEND" not in mode and "GANG" not in mode

    def job_ends_run(self, job_id: str, epoch: int) -> bool:
        """ends_run() of the job as Slurm reports it now; False if Slurm cannot say, asked
        ASK_TRIES times: a busy slurmctld's one timeout must not turn a preemption notice
        into a plain signal that ends the job without its image (grace is tens of seconds)."""
        for attempt in range(1, ASK_TRIES + 1):
            try:
                return self.ends_run(self.slurm.job(job_id), epoch)
            except SlurmMMError as exc:
                log.warning("job %s: cannot ask Slurm whether it is being preempted (try %d of %d): %s",
                            job_id, attempt, ASK_TRIES, exc)
                if attempt < ASK_TRIES:
                    time.sleep(ASK_PAUSE)
        return False

    def describe(self, job_id: str) -> str:
        """What selected_in_run() looks at, for a log line that says why not."""
        try:
            job = self.slurm.job(job_id)
        except SlurmMMError as exc:
            return f"Slurm cannot say: {exc}"
        return (f"state {job.state}, restart count {job.restart_count}, start_time {job.start_time}, "
                f"preempt_time {job.preempt_time}")

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
