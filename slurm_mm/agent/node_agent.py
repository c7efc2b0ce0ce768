"""The agent's server: accepts requests, authenticates them, runs job supervisors.

Requests (agent/protocol.py): `start` from a batch task (slurm-mm-run, which then
relays its signals on the same connection), `checkpoint` from `slurm-mm checkpoint`
(the job's owner or root), `status`. A watcher polls Slurm for jobs of this node that
were selected for preemption and for a node drain asked by `slurm-mm drain`, so that
no notice depends on the job having `--signal` set (docs/design.md, measured facts).
"""

from __future__ import annotations

import logging
import os
import pwd
import resource
import socket
import struct
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from slurm_mm.agent import admission, adopt, auth, enrollment, job_records, protocol, record_sweep, step_adopt, step_launch
from slurm_mm.agent.cgroups import step_cgroup_procs
from slurm_mm.agent.job_record import ACTIVE, JobState, LaunchRequest
from slurm_mm.agent.preemption import Preemption
from slurm_mm.agent.services import JobRegistry, NodeServices
from slurm_mm.agent.supervisor import JobSupervisor
from slurm_mm.checkpointer import JobCheckpointer
from slurm_mm.config import Config
from slurm_mm.engine.owner import owner_groups
from slurm_mm.errors import NotEnrolled, PermissionDenied, SlurmMMError
from slurm_mm.slurm.model import SlurmClient
from slurm_mm.store import Trigger

log = logging.getLogger(__name__)
DRAIN_PREFIX = "slurm_mm:"
RELAY_SPACING = 0.05  # seconds between two relayed signals of one job


def _printable(text: str, limit: int = 64) -> str:
    """A peer's string as it may go into a log line: quoted, escaped, cut."""
    return repr(str(text)[:limit])


def _raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard one (systemd's soft default is 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard, exc)


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.05)


class NodeAgent:
    def __init__(self, node: str, config: Config, slurm: SlurmClient, checkpointer: JobCheckpointer,
                 poll_interval: float = 2.0) -> None:
        self.node = node
        self.config = config
        self.slurm = slurm
        self.checkpointer = checkpointer
        self.poll_interval = poll_interval
        self.preemption = Preemption(slurm)
        self.jobs: JobRegistry[JobSupervisor] = JobRegistry()
        self.services = NodeServices(node, config, slurm, checkpointer, self.preemption, self.jobs,
                                     poll_interval=poll_interval)
        self.stopping = threading.Event()
        self.admission = admission.Admission()
        self.records = job_records.JobRecords(config.run_dir, node)  # what a restarted agent takes over
        checkpointer.records = self.records

    # ------------------------------------------------------------ server

    def serve(self, path: Path) -> None:
        """Serve requests on `path` until stopped. Refuses to start (PermissionDenied)
        when the staging directory is not a root-only directory root alone can reach."""
        try:
            self.checkpointer.check_staging()
        except SlurmMMError as exc:
            log.error("refusing to start: %s", exc)
            print(f"slurm-mm-agent: error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(exc.exit_code) from None
        _raise_fd_limit()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        server.bind(str(path))
        os.chmod(path, 0o666)  # anyone may connect; SO_PEERCRED decides what they get
        server.listen(128)
        threading.Thread(target=self._watch, name="watch", daemon=True).start()
        threading.Thread(target=record_sweep.sweep, name="sweep", daemon=True,
                         args=(self.records, self.slurm, self.node, self.config.run_dir / "steps")).start()
        log.info("agent for %s listening on %s", self.node, path)
        while not self.stopping.is_set():
            try:
                conn, _ = server.accept()
            except OSError as exc:
                # EMFILE/ENFILE/ENOMEM: the peer stays in the backlog; serve the others.
                if self.admission.should_log_refusal():
                    log.error("accept failed: %s; retrying", exc)
                time.sleep(0.1)
                continue
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        """Count the connection against its user's share before any work is done for it."""
        try:
            pid, uid, _gid = protocol.peer_credentials(conn)
        except OSError:
            conn.close()
            return
        slot = self.admission.admit(uid)
        if slot is None:
            if self.admission.should_log_refusal():
                log.warning("uid %d has too many connections open (or all users together do): "
                            "closing new ones", uid)
            conn.close()
            return
        try:
            # A peer that stops reading cannot hold a reply thread forever.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                            struct.pack("ll", int(admission.REQUEST_SECONDS), 0))
            threading.Thread(target=self._handle, args=(conn, pid, uid, slot), daemon=True).start()
        except (OSError, RuntimeError) as exc:  # no thread to be had: drop this one, keep serving
            log.error("cannot serve a connection of uid %d: %s", uid, exc)
            slot.release()
            conn.close()

    def _handle(self, conn: socket.socket, pid: int, uid: int, slot: admission.Slot) -> None:
        fds: list[int] = []
        try:
            # Only a batch task sends a job's whole environment; the rest is small.
            step_job = step_launch.step_task_job(pid)
            big = (auth.batch_step_job(pid, self.node) is not None or step_job in self.jobs
                   or (step_job is not None and step_job in self.records.job_ids()))
            message, fds = protocol.recv(
                conn, max_size=protocol.MAX_MESSAGE if big else protocol.MAX_SMALL_MESSAGE,
                deadline=time.monotonic() + admission.REQUEST_SECONDS)
            op = message["op"]
            if op == "start":
                self._start(conn, pid, uid, message, fds, slot)
                fds = []  # owned by the supervisor now
            elif op == "reattach" and step_job is not None:  # a step task's (agent/step_adopt.py)
                step_adopt.handle_task_reattach(self.services, conn, pid, uid, step_job, message, fds, slot.release)
                fds = []
            elif op == "reattach":  # a batch task whose agent restarted (agent/adopt.py)
                adopt.handle_reattach(self, conn, pid, uid, message, fds, slot.release)
                fds = []
            elif op == "srun":  # the srun stand-in of an enrolled job (agent/step_launch.py)
                step_launch.handle_srun(self.services, conn, pid, uid, message, fds)
            elif op == "checkpoint":
                conn.settimeout(admission.REQUEST_SECONDS)
                reply, then = self._checkpoint_request(uid, message)
                protocol.send(conn, reply)
                if then:
                    # The requester may be a step of this very job (srun from a login
                    # node): let it report before the requeue ends the job's steps.
                    _wait_gone(pid, 5.0)
                    then()
            elif op == "status":
                protocol.send(conn, {"op": "status", "node": self.node, "jobs": self.status(uid)})
            else:
                protocol.send(conn, {"op": "error", "message": f"unknown request {_printable(op)}"})
        except SlurmMMError as exc:
            self._reply_error(conn, str(exc), type(exc).__name__)
        except (protocol.ProtocolError, EOFError, OSError, KeyError, TypeError, ValueError) as exc:
            log.warning("bad request from pid %d uid %d: %s", pid, uid, _printable(str(exc), 200))
            self._reply_error(conn, f"bad request: {exc}")
        finally:
            slot.release()
            for fd in fds:
                os.close(fd)
            conn.close()

    @staticmethod
    def _reply_error(conn: socket.socket, text: str, kind: str = "SlurmMMError") -> None:
        try:
            protocol.send(conn, {"op": "error", "kind": kind, "message": text})
        except OSError:
            pass

    # ------------------------------------------------------------ start

    def _start(self, conn: socket.socket, pid: int, uid: int, message: dict, fds: list[int],
               slot: admission.Slot) -> None:
        job_id = str(message.get("job_id", ""))
        step_job = step_launch.step_task_job(pid)
        if step_job is not None:  # a task of a step the agent launched for a job here
            step_launch.handle_task_start(self.services, conn, pid, uid, step_job, message, fds, slot.release)
            return
        try:
            auth.check_batch_step(pid, job_id, self.node)
            enrollment.check_enrolled(self.config, job_id, self.node)
            earlier = self.jobs.get(job_id)
            if earlier is not None and earlier.record.state in ACTIVE:
                raise PermissionDenied(f"job {job_id} was already started on {self.node}")
            job = auth.authorize_batch_step(pid, uid, job_id, self.node, self.slurm)
            enrollment.claim_start(self.config, job_id, self.node, job.restart_count)
            request = self._launch_request(job, uid, pid, message, fds)
        except SlurmMMError as exc:
            log.warning("refused start of job %s from pid %d uid %d: %s", _printable(job_id), pid, uid,
                        _printable(str(exc), 300))
            protocol.send(conn, {"op": "refused", "message": str(exc)})
            for fd in fds:
                os.close(fd)
            return
        supervisor = JobSupervisor(self.services, request, conn)
        if self.jobs.add_unless(job_id, supervisor, lambda s: s.record.state in ACTIVE) is not None:
            protocol.send(conn, {"op": "refused", "message": f"job {job_id} was already started"})
            for fd in fds:
                os.close(fd)
            return
        # An authorised batch task: one per job, it no longer counts against its user.
        slot.release()
        conn.settimeout(None)
        try:
            mode = supervisor.start()
        except SlurmMMError as exc:
            self.jobs.forget(job_id, supervisor)
            protocol.send(conn, {"op": "refused", "message": str(exc)})
            return
        supervisor.send({"op": "started", "mode": mode})  # same lock as the exit message
        protocol.relay_signals(conn, supervisor.on_signal, RELAY_SPACING)

    def _launch_request(self, job, uid: int, pid: int, message: dict, fds: list[int]) -> LaunchRequest:
        argv, env, cwd = message.get("argv"), message.get("env"), message.get("cwd")
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            raise PermissionDenied("start request has no valid argv")
        if not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
            raise PermissionDenied("start request has no valid environment")
        if not isinstance(cwd, str) or not cwd.startswith("/"):
            raise PermissionDenied("start request has no valid working directory")
        if len(fds) != 3:
            raise PermissionDenied(f"start request carried {len(fds)} descriptors, expected 3")
        user = pwd.getpwuid(uid)
        gid = job.group_id or user.pw_gid
        try:
            interval = int(env.get("SLURM_MM_CHECKPOINT_INTERVAL", "0"))
        except ValueError:
            interval = 0
        if 0 < interval < self.config.min_interval:
            interval = self.config.min_interval
        return LaunchRequest(job=job, uid=uid, gid=gid, groups=owner_groups(uid, gid),
                             argv=argv, env=env, cwd=cwd, stdio=fds,
                             cgroup_procs=step_cgroup_procs(pid), interval=interval)

    # ------------------------------------------------------------ triggers

    def _checkpoint_request(self, uid: int, message: dict):
        # Decided from what this agent already knows (the supervisor's job, whose owner
        # slurmctld confirmed at start): no request makes the agent ask Slurm anything.
        job_id = str(message.get("job_id", ""))
        if not job_id.isdigit():
            raise PermissionDenied(f"invalid job id {_printable(job_id)}")
        supervisor = self.jobs.get(job_id)
        if supervisor is None:
            raise NotEnrolled(f"job {job_id} is not running under slurm_mm on {self.node} "
                              "(not enrolled with --checkpoint-interval, or still starting)")
        auth.authorize_owner_or_root(uid, supervisor.req.job)
        asked = str(message.get("trigger") or Trigger.MANUAL)
        if asked not in (Trigger.MANUAL, Trigger.DRAIN) or (asked == Trigger.DRAIN and uid != 0):
            raise PermissionDenied(f"trigger {_printable(asked)} is not allowed")
        trigger = Trigger(asked)
        requeue = bool(message.get("requeue")) or trigger == Trigger.DRAIN
        if uid != 0 and not requeue:
            self._rate_limit_manual(supervisor)
        self.checkpointer.hurry(job_id)
        image = supervisor.checkpoint(trigger, requeue=requeue, defer_requeue=True)
        if image is None:
            raise SlurmMMError(f"checkpoint of job {job_id} failed: {supervisor.record.last_error or 'job not running'}")
        reply = {"op": "checkpointed", "image": image.path.name, "trigger": trigger, "requeued": requeue}
        return reply, (lambda: supervisor.finish_stop(image, trigger)) if requeue else None

    def _rate_limit_manual(self, supervisor: JobSupervisor) -> None:
        """A user's manual checkpoints of a job: no more often than periodic ones may be.
        The time is the supervisor's, so it goes with the job's run."""
        now, spacing = time.monotonic(), self.config.min_interval
        with self.jobs.lock:
            last = supervisor.manual_checkpoint_at
            if last is not None and now - last < spacing:
                raise PermissionDenied(f"job {supervisor.job_id} was checkpointed on request {now - last:.0f} s "
                                       f"ago: one manual checkpoint per {spacing} s (min_interval)")
            supervisor.manual_checkpoint_at = now

    def _watch(self) -> None:
        """Poll Slurm: preemption notices and slurm_mm drains for this node's jobs."""
        while not self.stopping.wait(self.poll_interval):
            self.poll_once()

    def poll_once(self) -> dict[str, Trigger]:
        """One look at Slurm: start the preempt/drain image of each running job that needs
        one now; what was started, by job."""
        running = {j: s for j, s in self.jobs.items() if s.record.state == JobState.RUNNING}
        if not running:
            return {}
        try:
            node = self.slurm.node(self.node)
            here = self.slurm.jobs(self.node)
            records = {j.job_id: j for j in here}
            preempted = {j for j, s in running.items()
                         if j in records and self.preemption.ends_run(records[j], s.epoch)}
            runnable = {j.job_id for j in here if j.state == "RUNNING"}
        except SlurmMMError as exc:
            log.warning("cannot poll Slurm: %s", exc)
            return {}
        draining = node.draining and node.reason.startswith(DRAIN_PREFIX)
        started: dict[str, Trigger] = {}
        for job_id, supervisor in running.items():
            if job_id not in runnable or supervisor.suspended.is_set():
                continue  # a suspended (frozen) tree cannot be dumped
            trigger = Trigger.PREEMPT if job_id in preempted else Trigger.DRAIN if draining else None
            if trigger == Trigger.PREEMPT:
                supervisor.preempt_notice.saw("slurmctld's preempt_time, seen by the agent's poll")
            if trigger:
                self.checkpointer.hurry(job_id)
                threading.Thread(target=supervisor.checkpoint, args=(trigger,), daemon=True).start()
                started[job_id] = trigger
        return started

    # ------------------------------------------------------------ status

    def status(self, uid: int) -> list[dict]:
        records = [s.record for _, s in self.jobs.items()]
        return [dict(asdict(r), node=self.node) for r in records if uid in (0, r.uid)]
