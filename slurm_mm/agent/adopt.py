"""A restarted node agent takes over the jobs its predecessor was running.

The job trees outlive the agent (systemd's KillMode=process; the trees are in sessions
and cgroups of their own), and each batch task (`slurm-mm-run`) reconnects with a
`reattach` request carrying what a `start` carries (argv, environment, cwd, stdio).
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
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from slurm_mm.agent import auth, job_records, metrics, protocol
from slurm_mm.agent.job_record import ACTIVE, JobState, LaunchRequest
from slurm_mm.agent.services import JobRegistry, NodeServices
from slurm_mm.agent.supervisor import REQUEUED_EXIT, JobSupervisor
from slurm_mm.engine.proctree import tree_pids
from slurm_mm.errors import PermissionDenied, SlurmMMError
from slurm_mm.slurm.model import Job, SlurmClient
from slurm_mm.slurm.version import slurm_requeues_preempted_job_on_exit
from slurm_mm.store import Trigger

log = logging.getLogger(__name__)
LOST_STATUS = 1  # the tree ended and left no status: never read as success
KILLED_BY_DUMP = 128 + signal.SIGKILL  # how a tree ends when a stopping dump took it
RELAY_SPACING = 0.05  # seconds between two relayed signals of one job (as after a start)


@dataclass
class AdoptedTree:
    """A job tree this agent did not start: not its child, so it waits on pidfds."""

    init_pid: int
    waiter_pid: int
    records: job_records.JobRecords
    job_id: str
    waiter_fd: int | None  # pidfd of the process whose end is the job's end; None: ended
    init_fd: int | None
    files_report: list[str] = field(default_factory=list)
    gpu_suspended: list[int] = field(default_factory=list)
    _status: int | None = None

    @classmethod
    def of(cls, record: job_records.TreeRecord, records: job_records.JobRecords) -> AdoptedTree:
        def pidfd(pid: int, started: int) -> int | None:
            if not job_records.same_process(pid, started):
                return None
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                return None
            if not job_records.same_process(pid, started):  # reused between check and open
                os.close(fd)
                return None
            return fd

        return cls(record.init_pid, record.waiter_pid, records, record.job_id,
                   pidfd(record.waiter_pid, record.waiter_start), pidfd(record.init_pid, record.init_start))

    def _ended(self, timeout: float | None) -> bool:
        if self.waiter_fd is None:
            return True
        ready, _, _ = select.select([self.waiter_fd], [], [], timeout)
        return bool(ready)

    def _read_status(self) -> int:
        if self._status is None:
            for _ in range(20):  # mm-init writes before it exits; its last write may lag a little
                status = self.records.exit_status(self.job_id)
                if status is not None:
                    break
                time.sleep(0.05)
            else:
                log.warning("job %s: its tree ended without writing a status", self.job_id)
                status = LOST_STATUS
            self._status = status
            for fd in (self.waiter_fd, self.init_fd):
                if fd is not None:
                    os.close(fd)
            self.waiter_fd = self.init_fd = None
        return self._status

    def poll(self) -> int | None:
        return self._read_status() if self._status is not None or self._ended(0) else None

    def wait(self, timeout: float | None = None) -> int:
        if self._status is None and not self._ended(timeout):
            raise TimeoutError(f"adopted job (pid {self.init_pid}) still running after {timeout} s")
        return self._read_status()

    def signal(self, sig: int) -> None:
        if self.init_fd is not None and self._status is None:
            try:
                signal.pidfd_send_signal(self.init_fd, sig)
            except (ProcessLookupError, OSError):
                pass

    def kill(self) -> None:
        self.signal(signal.SIGKILL)


def continue_stopped(init_pid: int) -> list[int]:
    """Continue processes of the tree left stopped (not traced: a CRIU still at work on
    it finishes on its own). Returns the PIDs continued."""
    continued = []
    for pid in tree_pids(init_pid):
        try:
            with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if fields.get("State", "").strip().startswith("T") and fields.get("TracerPid", "0").strip() == "0":
            try:
                os.kill(pid, signal.SIGCONT)
                continued.append(pid)
            except ProcessLookupError:
                pass
    return continued


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
        protocol.relay_signals(conn, lambda signum: None, RELAY_SPACING)
        return
    supervisor.record.state = JobState.RUNNING
    metrics.registry.job_started(job_id, "adopted")
    log.info("job %s: took over its tree (init pid %d, run %d)", job_id, record.init_pid, record.epoch)
    threading.Thread(target=supervisor._wait_exit, name=f"wait-{job_id}", daemon=True).start()
    if request.interval > 0:
        threading.Thread(target=supervisor._periodic, name=f"periodic-{job_id}", daemon=True).start()
    supervisor.send({"op": "reattached", "mode": record.mode})
    protocol.relay_signals(conn, supervisor.on_signal, RELAY_SPACING)
