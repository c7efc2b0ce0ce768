"""Jobs whose work slurm_mm cannot capture whole: refuse them loudly, never fake an image.

An image holds the job's batch tree on its batch host and nothing else. Work outside
that tree would be lost by a restore without anyone noticing:
- a job allocated more than one node (its tasks on the other nodes are not in the image);
- MPI (agent/mpi.py): ranks hold links to their process manager and to each other;
- an `srun` step not run through slurm_mm's stand-in: the batch tree holds only the
  `srun` client, the step's tasks run under their own slurmstepd. A restored client
  finds its step gone and may exit 0, which turns lost work into a COMPLETED job.
Such a checkpoint is refused with one line in the job's stderr (and in `slurm-mm
status`). A stopping trigger (preemption, drain, requeue) then requeues the job without
an image: it reruns from its last whole image, or from the start, as Slurm would rerun it.
A restored tree that still holds an `srun` client (an image written before this check
existed) has lost that step: it is killed and the job fails with the reason.

Trusts: slurmctld's record of the job (its node list) and /proc of the job's tree.
Never acts on a process outside the tree it is given.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from slurm_mm.agent import dump_deadline, step_drain
from slurm_mm.agent.job_record import REQUEUED_EXIT, JobState
from slurm_mm.agent.mpi import REFUSAL_PREFIX as MPI_REFUSAL, mpi_processes, mpi_reason
from slurm_mm.agent.services import SupervisedJob
from slurm_mm.agent.step_launch import JobSteps
from slurm_mm.engine.proctree import exe_name, tree_pids
from slurm_mm.errors import CheckpointFailed, SlurmMMError
from slurm_mm.slurm.version import slurm_requeues_preempted_job_on_exit
from slurm_mm.store import Trigger

if TYPE_CHECKING:
    from slurm_mm.checkpointer import Dumped

log = logging.getLogger(__name__)

STEP_CLIENTS = frozenset({"srun"})
STOPPING_SETTLE_SECONDS = 5.0
# A notice comes from the watcher's poll (every poll interval) or a relayed signal (< 1 s).
NOTICE_SLACK_SECONDS = 1.5
DRAIN_SECONDS = 5.0  # a stopping dump's wait for each step's srun to write out and exit
QUIET_SECONDS = 3.0  # a periodic dump's wait for stopped tasks' output to land


# ---------------------------------------------------------------- what cannot be captured

def node_count(nodelist: str) -> int:
    """Hosts in a Slurm hostlist expression: 'n1' -> 1, 'n[1-3],m5' -> 4, '' -> 0."""
    total = 0
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        count = 1
        for ranges in re.findall(r"\[([^\]]*)\]", item):
            count *= sum(_range_size(part) for part in ranges.split(",") if part)
        total += count
    return total


def _range_size(part: str) -> int:
    low, sep, high = part.partition("-")
    try:
        return int(high) - int(low) + 1 if sep else 1
    except ValueError:
        return 1


@dataclass(frozen=True)
class StepClient:
    """An `srun` (step launcher) process inside the batch tree."""

    pid: int
    command: str

    def __str__(self) -> str:
        return f"`{self.command}` (pid {self.pid})"


def _program(pid: int) -> str:
    """The executable's name (proctree.exe_name), else the process's comm."""
    name = exe_name(pid)
    if name:
        return name
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def _command(pid: int, limit: int = 120) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = [w.decode(errors="replace") for w in f.read().split(b"\0") if w]
    except OSError:
        return "?"
    text = " ".join(words)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def step_clients(pids: Iterable[int]) -> list[StepClient]:
    """The `srun` clients among `pids` (a vanished process is simply not one); an srun's
    own helper child (srun forks one per step) is part of its client, not another step."""
    found = [pid for pid in pids if _program(pid) in STEP_CLIENTS]
    return [StepClient(pid, _command(pid)) for pid in found if _parent(pid) not in found]


def multi_node_reason(nodelist: str) -> str | None:
    count = node_count(nodelist)
    if count <= 1:
        return None
    return (f"this job was allocated {count} nodes ({nodelist}); slurm_mm checkpoints "
            "single-node jobs only, so it writes no images for it: preemption, drains and "
            "node failures requeue it to rerun from the start, as Slurm does")


def steps_reason(clients: list[StepClient]) -> str:
    shown = ", ".join(str(c) for c in clients[:3]) + (" ..." if len(clients) > 3 else "")
    return (f"not checkpointed: srun step {shown} is running and slurm_mm cannot checkpoint "
            "srun steps yet (an image would lose the step's work)")


# ---------------------------------------------------------------- hooks for the supervisor

class StepGuard:
    """Per job: decides whether a checkpoint would capture all of its work, and tells once."""

    def __init__(self, supervisor: SupervisedJob) -> None:
        self.sup = supervisor
        self.job_reason = multi_node_reason(supervisor.req.job.nodes)
        self._told: set[str] = set()
        self.jobsteps = JobSteps(supervisor)

    def prepare(self) -> None:
        """Before the script starts: its `srun` is the stand-in, so steps can be captured."""
        if not self.job_reason:
            try:
                self.jobsteps.prepare_env(self.sup.req.env)
            except OSError as exc:
                log.warning("job %s: cannot install the srun stand-in: %s", self.sup.job_id, exc)

    def on_start(self) -> None:
        """A job that can never be captured hears it once, when it starts."""
        if self.job_reason:
            self._tell_once(self.job_reason)
            self.sup.record.refused = self.job_reason

    def refusal(self, stopping: bool = False) -> str | None:
        """Why a checkpoint now would not capture the job's work (None: it would). A step
        that is starting or ending settles within moments: a stopping trigger waits."""
        if self.job_reason:
            return self.job_reason
        tree = self.sup.tree
        pids = tree_pids(tree.init_pid) if tree is not None else []
        mpi = mpi_processes([*pids, *self.jobsteps.task_pids()])
        if mpi:
            return mpi_reason(mpi)
        clients = step_clients(pids)
        if clients:
            return steps_reason(clients)
        deadline = time.monotonic() + (STOPPING_SETTLE_SECONDS if stopping else 0)
        while True:
            unsettled = self.jobsteps.unsettled()
            if unsettled is None or time.monotonic() >= deadline:
                return None if unsettled is None else f"not checkpointed now: {unsettled}"
            time.sleep(0.2)

    def dump(self, staging, trigger: str, stopping: bool, deadline: float | None,
             dump_batch: Callable[[bool], Dumped]) -> Dumped:
        """The step tasks, then the batch tree (`dump_batch(leave_running)`), into one image
        in which every byte a task's image counts as written is on the batch tree's side
        too (agent/step_drain.py). Stopping: the tasks' dumps end them, their `srun`s
        write out what the tasks wrote and exit, then the batch tree is dumped and ends.
        Periodic: the tasks stay stopped until the batch tree's dump is done."""
        jobsteps = self.jobsteps
        if not jobsteps.active():
            dumped = dump_batch(not stopping)
            dumped.extra["steps"] = {}
            return dumped
        if stopping:
            return self._dump_stopping(staging, trigger, deadline, dump_batch)
        try:
            record = jobsteps.dump(staging, leave_stopped=True)
            moving = step_drain.in_flight(jobsteps.task_output_fds(), [p.pid for p in jobsteps.sruns()],
                                          QUIET_SECONDS)
            if moving:
                raise CheckpointFailed(f"the steps' output did not settle within {QUIET_SECONDS:.0f} s "
                                       f"of their tasks' dump ({moving})")
            dumped = dump_batch(True)
        finally:
            jobsteps.resume()
        dumped.extra["steps"] = record
        return dumped

    def _dump_stopping(self, staging, trigger: str, deadline: float | None,
                       dump_batch: Callable[[bool], Dumped]) -> Dumped:
        jobsteps = self.jobsteps
        sruns = jobsteps.sruns()
        jobsteps.stopping = True
        try:
            record = jobsteps.dump(staging)
        except SlurmMMError as exc:
            if jobsteps.dumped_tasks:
                self.refuse(trigger, True, f"a step task's dump failed after {jobsteps.dumped_tasks} "
                            f"task(s) of the job's steps were dumped and ended ({exc})")
            else:
                jobsteps.stopping = False  # nothing ended: the job runs on as after any failed dump
            raise
        wait = DRAIN_SECONDS if deadline is None else min(
            DRAIN_SECONDS, max(1.0, deadline - time.time() - dump_deadline.FLOOR))
        late = step_drain.unfinished(sruns, wait)
        if late:
            for proc in late:
                proc.kill()
            reason = (f"srun {' '.join(map(str, late[0].args[1:]))[:60]} did not exit within {wait:.1f} s of "
                      "its tasks' dump, so their last output may not have reached the job script")
            self.refuse(trigger, True, reason)
            raise CheckpointFailed(reason)
        try:
            dumped = dump_batch(False)
        except SlurmMMError as exc:
            self.refuse(trigger, True, f"the batch tree's dump failed after its steps' tasks were dumped "
                        f"and ended ({exc})")
            raise
        dumped.extra["steps"] = record
        return dumped

    def unpack(self, staging, extra) -> None:
        """Before the batch tree's restore: the step tasks' images set aside and their files
        checked; FileStateRefused refuses the image while nothing of it runs."""
        steps_meta = extra.get("steps") if isinstance(extra, dict) else None
        if steps_meta:
            self.jobsteps.unpack(staging, steps_meta)

    def discard_unpacked(self) -> None:
        self.jobsteps.discard_unpacked()

    def restored(self, tree, extra) -> None:
        """The batch tree is back (also here, after a refused commit): bring back the
        steps it waits on."""
        self.jobsteps.stopping = False
        steps_meta = extra.get("steps") if isinstance(extra, dict) else None
        if steps_meta:
            self.jobsteps.restored(tree, steps_meta)

    def refuse(self, trigger: str, stopping: bool, reason: str) -> None:
        """Called with the job's lock held, instead of a dump."""
        sup = self.sup
        sup.record.last_error = reason
        sup.record.refused = reason
        if not stopping:
            if reason == self.job_reason:
                return  # told at start
            if not reason.startswith(MPI_REFUSAL):
                reason += "; periodic checkpoints resume once no step runs"
            self._tell_once(reason)
            return
        last = sup.record.last_image.get("name") or _stored_latest(sup)
        where = f"its last whole image {last}" if last else "the beginning (no whole image exists)"
        sup.record.state = JobState.REQUEUED  # the tree's end is the requeue's, not the job's
        if trigger == Trigger.PREEMPT and slurm_requeues_preempted_job_on_exit():
            # Slurm 24.05+ requeues a job whose script ends in its grace time; a requeue of our
            # own would leave its preemption mark set and requeue the next run once more.
            sup.tell(f"{trigger}: {reason}; Slurm requeues the job to rerun from {where}")
            sup.send({"op": "exit", "status": REQUEUED_EXIT})
            return
        sup.tell(f"{trigger}: {reason}; requeueing the job to rerun from {where}")
        threading.Thread(target=self._requeue, name=f"requeue-{sup.job_id}", daemon=True).start()

    def ended_by_preemption(self, status: int) -> bool:
        """Called with the job's lock held when the tree ends. Slurm ends srun steps when it
        preempts a job, and a step slurm_mm does not run (`/usr/bin/srun`) is gone before
        anything can be dumped: the script then fails, and only a requeue (a rerun) keeps
        that from ending the job FAILED. True: requeued. Only a preemption of this very run
        that the agent was told of counts (agent/preemption.py): anything else that ends a
        script non-zero (an owner's `scontrol requeue`, a failing step) is the job's exit."""
        if status == 0 or not self._preempted_this_run():
            self.jobsteps.cleanup()
            return False
        self.refuse(Trigger.PREEMPT, True, f"the job script ended with exit code {status} while this run "
                    f"was being preempted ({self.sup.preempt_notice.source}; Slurm ends srun steps "
                    "when preemption starts, before an image could hold them)")
        return True

    def _preempted_this_run(self) -> bool:
        sup = self.sup
        if not sup.services.preemption.job_ends_run(sup.job_id, sup.epoch):
            return False
        wait = sup.services.poll_interval + NOTICE_SLACK_SECONDS
        if sup.preempt_notice.wait(wait):
            return True
        log.warning("job %s: slurmctld shows this run preempted but no notice reached the agent "
                    "within %.1f s: the script's exit stands", sup.job_id, wait)
        return False

    def clear(self) -> None:
        """A checkpoint went through: nothing is refused any more."""
        if not self.job_reason:
            self.sup.record.refused = ""

    def check_restored(self, tree) -> None:
        """A restored tree holding an `srun` client has lost that step: kill it so that the
        job fails with the reason instead of the client reporting success."""
        clients = step_clients(tree_pids(tree.init_pid))
        if not clients:
            return
        self.sup.tell(f"error: the restored image held srun step {clients[0]}, whose tasks are "
                      "gone (slurm_mm does not restore srun steps yet); failing the job "
                      "instead of reporting its lost work as done")
        try:
            os.kill(tree.init_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _tell_once(self, text: str) -> None:
        if text in self._told:
            log.info("job %s: %s", self.sup.job_id, text)
            return
        self._told.add(text)
        self.sup.tell(text)

    def _requeue(self) -> None:
        sup = self.sup
        try:
            sup.services.slurm.requeue(sup.job_id)
        except SlurmMMError as exc:
            sup.tell(f"requeue failed ({exc}); Slurm's own preemption or the admin must requeue it")
            with sup.lock:
                if sup.record.state == JobState.REQUEUED:
                    sup.record.state = JobState.RUNNING


def _stored_latest(sup: SupervisedJob) -> str | None:
    try:
        images = sup.services.checkpointer.store.images(sup.job_id)
    except (SlurmMMError, OSError):
        return None
    return images[0].path.name if images else None
