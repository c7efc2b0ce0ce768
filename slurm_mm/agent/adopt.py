"""A restarted node agent takes over the jobs its predecessor was running.

The job trees outlive the agent (systemd's KillMode=process; the trees are in sessions
and cgroups of their own), and each batch task (`slurm-mm-run`) reconnects with a
`reattach` request carrying what a `start` carries (argv, environment, cwd, stdio);
the job's `srun` steps are taken over with it (agent/step_adopt.py).
The agent checks it exactly as a start (the peer is the job's batch step here, Slurm
confirms owner and run), finds the job's record (job_records.py) and takes the tree
over: its end comes from the status file mm-init writes, signals go to its init
through a pidfd, checkpoints and triggers resume. A checkpoint the restart cut short
committed nothing (the store's commit is atomic), so the previous image stays latest;
a process left stopped by it is continued.

Runs as root. Trusts only its own records, re-checked against the kernel (start times).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from typing import Callable, Protocol

from slurm_mm.agent import auth, job_records, metrics, protocol, step_adopt
from slurm_mm.agent.adopted import AdoptedTree, continue_stopped  # noqa: F401  (re-exported)
from slurm_mm.agent.job_record import ACTIVE, JobState, LaunchRequest
from slurm_mm.agent.services import JobRegistry, NodeServices
from slurm_mm.agent.supervisor import REQUEUED_EXIT, JobSupervisor
from slurm_mm.errors import PermissionDenied, SlurmMMError
from slurm_mm.slurm.model import Job, SlurmClient
from slurm_mm.slurm.version import slurm_requeues_preempted_job_on_exit
from slurm_mm.store import Trigger

log = logging.getLogger(__name__)
KILLED_BY_DUMP = 128 + signal.SIGKILL  # how a tree ends when a stopping dump took it
RELAY_SPACING = 0.05  # seconds between two relayed signals of one job (as after a start)


class ReattachHost(Protocol):
    """What taking a job over uses of the node agent."""

    node: str
    records: job_records.JobRecords
    slurm: SlurmClient
    services: NodeServices
    jobs: JobRegistry[JobSupervisor]

    def _launch_request(self, job: Job, uid: int, pid: int, message: dict,
                        fds: list[int]) -> LaunchRequest: ...


def _requeue_cut_short(supervisor: JobSupervisor, trigger: str) -> None:
    """A preempt/drain dump ended the tree but the restart came before its commit: the
    job resumes from its last stored image on its next run."""
    last = supervisor.record.last_image.get("name") or "none (the script reruns from the start)"
    supervisor.tell(f"the node agent restarted during the {trigger} checkpoint, before it was stored; "
                    f"requeueing: the next run resumes from the last stored image ({last})")
    supervisor.record.state = JobState.CHECKPOINTED
    if trigger == Trigger.PREEMPT and slurm_requeues_preempted_job_on_exit():
        supervisor.record.state = JobState.REQUEUED
        supervisor.send({"op": "exit", "status": REQUEUED_EXIT})
        return
    supervisor._requeue()


def handle_reattach(agent: ReattachHost, conn: socket.socket, pid: int, uid: int, message: dict,
                    fds: list[int], release_slot: Callable[[], None]) -> None:
    """A batch task whose agent restarted: take its job over and relay its signals again."""
    job_id = str(message.get("job_id", ""))
    try:
        auth.check_batch_step(pid, job_id, agent.node)
        earlier = agent.jobs.get(job_id)
        if earlier is not None and earlier.record.state in ACTIVE:
            raise PermissionDenied(f"job {job_id} is already supervised on {agent.node}")
        record = agent.records.load(job_id)
        if record is None:
            raise PermissionDenied(f"job {job_id} has no record on {agent.node}: nothing to reattach to")
        job = auth.authorize_batch_step(pid, uid, job_id, agent.node, agent.slurm)
        if record.uid != uid or record.epoch != job.restart_count:
            raise PermissionDenied(f"job {job_id}: the record is of another run or owner")
        request = agent._launch_request(job, uid, pid, message, fds)
    except SlurmMMError as exc:
        log.warning("refused reattach of job %r from pid %d uid %d: %s", job_id[:32], pid, uid, exc)
        protocol.send(conn, {"op": "refused", "message": str(exc)})
        for fd in fds:
            os.close(fd)
        return
    supervisor = JobSupervisor(agent.services, request, conn)
    supervisor.tree = AdoptedTree.of(record, agent.records)
    supervisor.record.last_image = dict(record.last_image)
    if agent.jobs.add_unless(job_id, supervisor, lambda s: s.record.state in ACTIVE) is not None:
        protocol.send(conn, {"op": "refused", "message": f"job {job_id} is already supervised"})
        return
    release_slot()
    conn.settimeout(None)
    continued = continue_stopped(record.init_pid)
    if continued:
        log.warning("job %s: continued %s, left stopped by the interrupted agent", job_id, continued)
    supervisor.record.mode = record.mode
    if record.stopping and supervisor.tree.poll() == KILLED_BY_DUMP:
        _requeue_cut_short(supervisor, record.stopping)
        job_records.forget(agent.records, job_id)  # the tree is over here
        protocol.relay_signals(conn, lambda signum: None, RELAY_SPACING)
        return
    supervisor.record.state = JobState.RUNNING
    step_adopt.adopt_steps(supervisor, record.steps, agent.records)  # their tasks reattach on their own
    metrics.registry.job_started(job_id, "adopted")
    log.info("job %s: took over its tree (init pid %d, run %d)", job_id, record.init_pid, record.epoch)
    threading.Thread(target=supervisor._wait_exit, name=f"wait-{job_id}", daemon=True).start()
    if request.interval > 0:
        threading.Thread(target=supervisor._periodic, name=f"periodic-{job_id}", daemon=True).start()
    supervisor.send({"op": "reattached", "mode": record.mode})
    protocol.relay_signals(conn, supervisor.on_signal, RELAY_SPACING)
