"""Single-node `srun` steps of an enrolled job: run them so that a checkpoint carries them.

Three parts, all for jobs whose batch tree this agent supervises:
- `srun` request (from the stand-in, slurm_mm/step_client.py, inside the batch tree):
  the agent runs Slurm's real `srun` outside the tree, as the job's user, in the batch
  step's cgroups, with the stand-in's stdio, and writes its exit code to a file the
  stand-in polls. srun runs under slurm_mm/srun_keeper.py, which records that code for
  an agent that restarts meanwhile (agent/step_adopt.py). The step's environment carries a token naming the step.
- step task start (slurm-mm-run as a step task, the SPANK plugin redirects tasks whose
  environment carries a token): the task's command starts under mm-init like the batch
  script (its own PID namespace, the step's cgroups, the task's stdio), or, for a step
  relaunched after a restore, its task tree is restored from the image instead.
- dump/restore: each task tree is dumped after the batch tree into the same image (files
  named `step@TOKEN@RANK@...`); the manifest's extra lists the steps. A restore relaunches
  each step's `srun` with the recorded command line and a restore request, taking stdio
  from the restored stand-in, whose exit file then receives the new srun's exit code.

Trusts: SO_PEERCRED, /proc (cgroups, tree membership), the agent's own records. The
token and rank a task sends only select among images of the task's own job. Everything
run for the user runs with the user's ids, groups and working directory.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slurm_mm.agent import job_records, protocol
from slurm_mm.agent.cgroups import step_cgroup_procs
from slurm_mm.agent.job_record import ACTIVE, LaunchRequest
from slurm_mm.agent.mpi import is_mpi_step
from slurm_mm.agent.services import NodeServices, SupervisedJob
from slurm_mm.checkpointer import ProcessTree, RestoreTarget
from slurm_mm.engine.restore import RestoredTree
from slurm_mm.config import agent_socket
from slurm_mm.engine.proctree import tree_pids
from slurm_mm.engine import filestate
from slurm_mm.errors import CheckpointFailed, FileStateRefused, PermissionDenied, SlurmMMError
from slurm_mm.store import Trigger

log = logging.getLogger(__name__)

TOKEN_ENV = "SLURM_MM_STEP_TOKEN"
RESTORE_ENV = "SLURM_MM_RESTORE_STEP"
FILE_PREFIX = "step@"
_STEP_CGROUP = re.compile(r"/job_(\d+)/step_(\d+)(?:/|$)")
_TOKEN = re.compile(r"[0-9a-f]{16}")


# ---------------------------------------------------------------- records

@dataclass
class StepTask:
    rank: int
    tree: ProcessTree
    req: LaunchRequest | None = None  # what a dump records of the task's files comes from it
    stdio: list[int] = field(default_factory=list)  # the task's fds from slurmstepd, until it ends


@dataclass
class Step:
    """One `srun` of the job's script, as the agent runs it."""

    token: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    standin_ns_pid: int
    ntasks: int = 0  # known once a task has started
    tasks: dict[int, StepTask] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    restoring: dict[int, Path] = field(default_factory=dict)  # rank -> image dir
    restored: set[int] = field(default_factory=set)
    gpu: dict[int, dict[str, Any]] = field(default_factory=dict)  # rank -> GPU inventory of its image

    def meta(self) -> dict[str, Any]:
        return {"argv": self.argv, "env": self.env, "cwd": self.cwd, "standin_ns_pid": self.standin_ns_pid,
                "ntasks": self.ntasks, "ranks": sorted(self.tasks)}


class JobSteps:
    """The running steps of one job on this node."""

    def __init__(self, sup: SupervisedJob) -> None:
        self.sup = sup
        self.lock = threading.Lock()
        self.steps: dict[str, Step] = {}
        self.stopping = False  # a stopping dump is ending the steps: their exits mean nothing
        self.unpacked: dict[str, dict[int, Path]] = {}  # token -> rank -> image, for a restore
        self.dumped_tasks = 0  # task trees the last dump() went through
        self.held: list[int] = []  # processes a leave-stopped dump left stopped, for resume()

    # -------------------------------------------------------- paths

    @property
    def services(self) -> NodeServices:
        return self.sup.services

    def exit_dir(self) -> Path:
        return self.services.config.run_dir / "steps" / self.sup.job_id

    def bin_dir(self) -> Path:
        return self.services.config.run_dir / "bin"

    # -------------------------------------------------------- launch

    def prepare_env(self, env: dict[str, str]) -> None:
        """The batch script finds the stand-in as `srun` first on its PATH."""
        bin_dir = self.bin_dir()
        _install_standin(bin_dir)
        env["PATH"] = f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"
        env["SLURM_MM_STEPS_BIN"] = str(bin_dir)
        env["SLURM_MM_STEPS_SOCKET"] = str(agent_socket(self.services.config, self.services.node))

    def start_srun(self, argv: list[str], env: dict[str, str], cwd: str, fds: list[int], ns_pid: int,
                   token: str | None = None, restoring: dict[int, Path] | None = None,
                   gpu: dict[int, dict[str, Any]] | None = None) -> Path:
        """Run the real srun for the job; returns the exit file the stand-in waits on.
        `gpu`: per rank being restored, the GPU inventory its image was dumped with."""
        token = token or secrets.token_hex(8)
        step = Step(token, argv, env, cwd, ns_pid, restoring=restoring or {}, gpu=gpu or {})
        exit_file = self.exit_dir() / token
        self.exit_dir().mkdir(parents=True, exist_ok=True, mode=0o755)
        exit_file.unlink(missing_ok=True)
        run_env = self._srun_env(env, token, restore=bool(restoring))
        req = self.sup.req
        with self.lock:  # known before its tasks can ask for it
            self.steps[token] = step
        # With job records, srun runs under a keeper that records its exit code, so a
        # restarted agent can take the step over (agent/step_adopt.py).
        status_fd = self._status_fd(srun_key(token))
        argv0 = ["srun"] if status_fd is None else [sys.executable, "-I", "-m", "slurm_mm.srun_keeper",
                                                     str(status_fd), "srun"]
        try:
            step.proc = subprocess.Popen(
                [*argv0, *argv], env=run_env, stdin=fds[0], stdout=fds[1], stderr=fds[2], close_fds=True,
                pass_fds=() if status_fd is None else (status_fd,),
                preexec_fn=_become(req.uid, req.gid, req.groups, cwd, req.cgroup_procs))
        except OSError as exc:
            with self.lock:
                self.steps.pop(token, None)
            raise SlurmMMError(f"cannot run srun for job {self.sup.job_id}: {exc}") from None
        finally:
            if status_fd is not None:
                os.close(status_fd)
        self.persist()
        self.watch_srun(step)
        return exit_file

    def watch_srun(self, step: Step) -> None:
        threading.Thread(target=self._wait_srun, args=(step, self.exit_dir() / step.token), daemon=True,
                         name=f"srun-{self.sup.job_id}-{step.token}").start()

    # -------------------------------------------------------- records (agent/step_adopt.py)

    def _records(self) -> job_records.JobRecords | None:
        return getattr(self.services.checkpointer, "records", None)

    def _status_fd(self, key: str) -> int | None:
        records = self._records()
        if records is None:
            return None
        try:
            return records.status_fd(self.sup.job_id, key)
        except (OSError, ValueError) as exc:
            log.warning("job %s: no status file for %s (%s): an agent restart would lose the step",
                        self.sup.job_id, key, exc)
            return None

    def persist(self) -> None:
        """The job's record with its steps as they are now (nothing once the job's record is gone)."""
        job_records.save(self._records(), self.sup, stopping=None)

    def persisted(self) -> dict[str, Any]:
        """What a restarted agent needs to take the steps over: each step's launch, its
        srun keeper and its tasks' trees (their PIDs with their kernel start times)."""
        out: dict[str, Any] = {}
        with self.lock:
            steps = [(s, dict(s.tasks)) for s in self.steps.values()]
        for step, tasks in steps:
            keeper = getattr(step.proc, "pid", None)
            started = job_records.start_time(keeper) if keeper else None
            if started is None or set(step.restoring) - step.restored:
                continue  # not under a keeper, ended, or still being restored: not taken over
            trees = {}
            for rank, task in tasks.items():
                pids = job_records.tree_pids_of(task.tree)
                if pids is not None:
                    trees[str(rank)] = list(pids)
            out[step.token] = {**step.meta(), "srun": [keeper, started], "tasks": trees}
        return out

    def _srun_env(self, env: dict[str, str], token: str, restore: bool) -> dict[str, str]:
        """The stand-in's environment, with this run's Slurm variables (a restored script
        still holds the old run's node list)."""
        out = dict(env)
        for key, value in self.sup.req.env.items():
            if key.startswith("SLURM_") and not key.startswith("SLURM_MM_"):
                out[key] = value
        shim = env.get("SLURM_MM_STEPS_BIN", str(self.bin_dir()))
        out["PATH"] = ":".join(p for p in out.get("PATH", "").split(":") if p and p != shim) or "/usr/bin:/bin"
        out[TOKEN_ENV] = token
        out.pop(RESTORE_ENV, None)
        if restore:
            out[RESTORE_ENV] = token
        return out

    def _wait_srun(self, step: Step, exit_file: Path) -> None:
        rc = step.proc.wait()
        code = rc if rc >= 0 else 128 - rc
        with self.lock:  # a step relaunched in place after a refused commit has the same token
            mine = self.steps.get(step.token) is step
            if mine:
                del self.steps[step.token]
        records = self._records()
        if records is not None and mine:
            records.remove_status(self.sup.job_id, srun_key(step.token))
        self.persist()
        for path in step.restoring.values():
            shutil.rmtree(path, ignore_errors=True)
        missing = sorted(set(step.restoring) - step.restored)
        if missing and not self.stopping:
            self.fail_job(f"step `srun {' '.join(step.argv)[:80]}` ended (exit {code}) before its "
                          f"task(s) {missing} were restored")
            return
        if self.stopping or self.sup.record.state not in ACTIVE:
            return  # the job was checkpointed to stop: its tree is gone or going
        exit_file.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        tmp = exit_file.with_name(f".{exit_file.name}.tmp")
        tmp.write_text(f"{code}\n")
        os.chmod(tmp, 0o644)
        os.rename(tmp, exit_file)

    # -------------------------------------------------------- step tasks

    def start_task(self, conn: socket.socket, pid: int, message: dict, fds: list[int],
                   admitted=lambda: None) -> None:
        """`admitted`: called once the task is known, so that its long-lived connection no
        longer counts against its user's share of agent connections (as a batch task's)."""

        argv, env, cwd = message.get("argv"), message.get("env"), message.get("cwd")
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)
                and isinstance(env, dict) and isinstance(cwd, str) and len(fds) == 3):
            raise PermissionDenied("step task start request is malformed")
        token = str(env.get(TOKEN_ENV, ""))
        with self.lock:
            step = self.steps.get(token)
        if step is None:
            raise PermissionDenied(f"no step with token '{token}' runs for job {self.sup.job_id} here")
        try:
            rank = int(env.get("SLURM_PROCID", ""))
            ntasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 0)
        except ValueError:
            raise PermissionDenied("step task has no valid SLURM_PROCID") from None
        req = self.sup.req
        task_req = LaunchRequest(job=req.job, uid=req.uid, gid=req.gid, groups=req.groups, argv=argv,
                                 env=env, cwd=cwd, stdio=fds, cgroup_procs=step_cgroup_procs(pid), interval=0)
        image = step.restoring.get(rank)
        checkpointer = self.services.checkpointer
        key = task_key(token, rank)
        if image is not None:
            try:
                tree = checkpointer.restore(image, RestoreTarget.of(task_req), step.gpu.get(rank),
                                            pin_root=checkpointer.pin_root(self.sup.job_id),
                                            **self._status_args(key))
            except SlurmMMError as exc:
                self.fail_job(f"cannot restore task {rank} of step `srun {' '.join(step.argv)[:80]}`: {exc}")
                raise
            step.restored.add(rank)
            self.sup.tell(f"restored task {rank} of step `srun {' '.join(step.argv)[:80]}`")
            for line in getattr(tree, "files_report", []):
                self.sup.tell(f"file {line} (task {rank})")
        else:
            tree = checkpointer.launch(task_req, **self._status_args(key, launch=True))
        task = StepTask(rank, tree, task_req, list(fds))
        with self.lock:
            step.ntasks = max(step.ntasks, ntasks)
            step.tasks[rank] = task
        self.persist()
        self.attach_task(conn, step, task, fds, admitted, "restored" if image is not None else "launched")

    def _status_args(self, key: str, launch: bool = False) -> dict[str, Any]:
        """How a task's tree records its end (job records only)."""
        if self._records() is None:
            return {}
        return {"record_end": True, "status_key": key} if launch else {"job_id": self.sup.job_id, "status_key": key}

    def attach_task(self, conn: socket.socket, step: Step, task: StepTask, fds: list[int],
                    admitted, mode: str) -> None:
        """The task's slurm-mm-run learns its tree's end and relays its signals (also when
        a restarted agent takes the task over: `mode` "reattached")."""
        rank, tree = task.rank, task.tree
        send_lock = threading.Lock()

        def send(msg: dict) -> None:
            with send_lock:
                try:
                    protocol.send(conn, msg)
                except OSError:
                    pass

        def wait() -> None:
            status = tree.wait()
            with self.lock:
                if step.tasks.get(rank) is task:
                    del step.tasks[rank]
                task.stdio = []
                stopping = self.stopping
            records = self._records()
            if records is not None:
                records.remove_status(self.sup.job_id, task_key(step.token, rank))
            self.persist()
            # A stopping dump ended the task: its srun's exit is nobody's, and an error line
            # from it would land in the job's output inside the batch tree's image.
            send({"op": "exit", "status": 0 if stopping else status})
            for fd in fds:
                os.close(fd)

        threading.Thread(target=wait, daemon=True, name=f"task-{self.sup.job_id}-{rank}").start()
        admitted()
        conn.settimeout(None)  # the request's deadline is over: the task relays for its lifetime
        send({"op": "reattached" if mode == "reattached" else "started", "mode": mode})
        protocol.relay_signals(conn, lambda signum: self._on_task_signal(tree, signum))

    def _on_task_signal(self, tree: ProcessTree, signum: int) -> None:
        """Slurm ends a job's steps (SIGTERM, SIGKILL after KillWait) as soon as it preempts
        the job: that SIGTERM starts the job's preemption checkpoint instead of ending the
        task, which the checkpoint then dumps within KillWait."""
        if signum == signal.SIGTERM and self.services.preemption.job_ends_run(self.sup.job_id, self.sup.epoch):
            self.sup.preempt_notice.saw("SIGTERM to a step task")
            threading.Thread(target=self.sup.checkpoint, args=(Trigger.PREEMPT,), daemon=True).start()
            return
        if signum == signal.SIGTERM:
            log.info("job %s: SIGTERM to a step task passed on: Slurm shows no preemption of this run (%s)",
                     self.sup.job_id, self.services.preemption.describe(self.sup.job_id))
        tree.signal(signum)

    def fail_job(self, reason: str, tree: ProcessTree | None = None) -> None:
        """A restored script waits on a step that cannot come back: end the job FAILED
        with the reason, never let the script carry on as if the step had run."""
        self.sup.tell(f"error: {reason}; failing the job instead of reporting its lost work as done")
        tree = tree or self.sup.tree
        if tree is not None:
            try:
                os.kill(tree.init_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # -------------------------------------------------------- checkpoint

    def unsettled(self) -> str | None:
        """Why the steps cannot be dumped now (a step starting or ending), or None."""
        with self.lock:
            steps = list(self.steps.values())
        for step in steps:
            if step.proc is None or step.proc.poll() is not None:
                return f"step `srun {' '.join(step.argv)[:80]}` is ending"
            if step.ntasks == 0 or len(step.tasks) < step.ntasks:
                return f"step `srun {' '.join(step.argv)[:80]}` is still starting its tasks"
        return None

    def active(self) -> bool:
        with self.lock:
            return bool(self.steps)

    def task_pids(self) -> list[int]:
        """Host PIDs of every running step task's tree (what a dump of them must fit)."""
        with self.lock:
            inits = [task.tree.init_pid for step in self.steps.values() for task in step.tasks.values()]
        return [pid for init in inits for pid in tree_pids(init)]

    def sruns(self) -> list[KeptSrun]:
        """The real `srun` of each running step."""
        with self.lock:
            return [KeptSrun(s.proc, ["srun", *s.argv]) for s in self.steps.values() if s.proc is not None]

    def task_output_fds(self) -> list[int]:
        """stdout/stderr of every running task, as slurmstepd gave them (for their fill)."""
        with self.lock:
            return [fd for s in self.steps.values() for t in s.tasks.values() for fd in t.stdio[1:3]]

    def resume(self) -> None:
        """Let the tasks a leave-stopped dump left stopped run again."""
        held, self.held = self.held, []
        for pid in held:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def dump(self, staging: Path, leave_running: bool = False, leave_stopped: bool = False) -> dict[str, Any]:
        """Dump every step task into `staging` (before the batch tree); the manifest's record.
        Without `leave_running` or `leave_stopped` the dumps end the tasks; with
        `leave_stopped` the tasks stay stopped until resume() (processes that were stopped
        already stay so). `dumped_tasks` counts the trees done, also when one fails.
        Each task's files are captured with it as the batch tree's are (engine.filestate,
        at CRIU's post-dump action), pinned under the job's pin root as
        `<image's dump>@<token>@<rank>`; `files` keeps each task's summary. A task's GPU
        state goes through the same CUDA checkpoint as the batch tree's (checkpointer.dump);
        `gpu` keeps, per rank that had any, the inventory its restore must be given."""
        with self.lock:
            steps = [(s, dict(s.tasks)) for s in self.steps.values()]
        checkpointer, record = self.services.checkpointer, {}
        self.dumped_tasks = 0
        for step, tasks in steps:
            meta = {**step.meta(), "ranks": sorted(tasks), "files": {}}  # a stopping dump ends the tasks
            for rank, task in sorted(tasks.items()):
                # Beside the image's staging (a GPU job's is on tmpfs): its files move there by rename.
                scratch = checkpointer.staging_beside(staging, f"{staging.name}@step-{step.token}-{rank}")
                req = task.req or self.sup.req
                files = checkpointer.file_spec(self.sup.job_id, req.owner, env=req.env, script=req.argv[0],
                                               pin_name=f"{staging.name}@{step.token}@{rank}")
                try:
                    before = _stopped(tree_pids(task.tree.init_pid)) if leave_stopped else set()
                    dumped = checkpointer.dump(task.tree.init_pid, scratch, leave_running=leave_running,
                                               leave_stopped=leave_stopped, files=files)
                    self.dumped_tasks += 1
                    if leave_stopped:
                        self.held += [p for p in tree_pids(task.tree.init_pid) if p not in before]
                    for path in scratch.iterdir():
                        try:
                            os.rename(path, staging / f"{FILE_PREFIX}{step.token}@{rank}@{path.name}")
                        except OSError as exc:
                            raise CheckpointFailed(f"task {rank}'s image cannot join the job's: {exc}") from None
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
                summary = dumped.extra.get("files", {})
                meta["files"][str(rank)] = summary
                if dumped.gpu_inventory:
                    meta.setdefault("gpu", {})[str(rank)] = dumped.gpu_inventory
                for note in summary.get("notes", []):
                    self.sup.tell(f"task {rank} of step `srun {' '.join(step.argv)[:60]}`: {note}")
            record[step.token] = meta
        return record

    # -------------------------------------------------------- restore

    def unpack(self, staging: Path, steps_meta: object) -> None:
        """Before the batch tree's restore: each step task's image to its own staging
        directory, and its files checked (as their owner, changing nothing) against their
        record. A task whose files cannot be brought back refuses the whole image
        (FileStateRefused naming them) while nothing of it runs: the next image or the
        restore policy decides, instead of a restored script failing later."""
        self.discard_unpacked()
        if not isinstance(steps_meta, dict):
            return
        checkpointer, owner = self.services.checkpointer, self.sup.req.owner
        for token, meta in steps_meta.items():
            if not _TOKEN.fullmatch(str(token)) or not isinstance(meta, dict):
                continue
            images: dict[int, Path] = {}
            self.unpacked[str(token)] = images
            for rank in meta.get("ranks", []):
                kept = checkpointer.staging_beside(staging, f"{staging.name}@step-{token}-{int(rank)}")
                images[int(rank)] = kept
                prefix = f"{FILE_PREFIX}{token}@{int(rank)}@"
                for path in staging.iterdir():
                    if path.name.startswith(prefix):
                        os.rename(path, kept / path.name[len(prefix):])
                state = filestate.FileState.read(kept)
                if state is None:
                    continue
                found = filestate.plan(state, kept, node=self.services.node, uid=owner.uid, gids=list(owner.groups),
                                       pin_root=checkpointer.pin_root(self.sup.job_id))
                if found.problems:
                    self.discard_unpacked()
                    raise FileStateRefused(f"task {int(rank)} of step `srun {' '.join(meta.get('argv', []))[:60]}`: "
                                           + "; ".join(found.problems[:5]))

    def discard_unpacked(self) -> None:
        """Step images unpacked for a restore that did not happen."""
        for images in self.unpacked.values():
            for path in images.values():
                shutil.rmtree(path, ignore_errors=True)
        self.unpacked = {}

    def restored(self, tree: RestoredTree, steps_meta: object) -> None:
        """After the batch tree's restore: relaunch each step it was waiting on, restoring
        the step's tasks from their unpacked images."""
        unpacked, self.unpacked = self.unpacked, {}
        if not isinstance(steps_meta, dict):
            return
        for token, images in unpacked.items():
            meta = steps_meta[token]
            host_pid = tree.ns_pids.get(int(meta.get("standin_ns_pid", 0)))
            fds = _fds_of(host_pid) if host_pid else None
            try:
                self.start_srun(list(meta["argv"]), dict(meta["env"]), str(meta["cwd"]),
                                fds or self.sup.req.stdio, int(meta.get("standin_ns_pid", 0)),
                                token=str(token), restoring=images, gpu=_rank_gpu(meta))
            except (SlurmMMError, KeyError, TypeError, ValueError) as exc:
                for path in images.values():
                    shutil.rmtree(path, ignore_errors=True)
                self.fail_job(f"cannot relaunch step {token} of the image: {exc}", tree)
                return
            finally:
                for fd in fds or []:
                    os.close(fd)
            self.sup.tell(f"relaunched step `srun {' '.join(meta['argv'])[:80]}` to restore its "
                          f"{len(images)} task(s)")

    def cleanup(self) -> None:
        shutil.rmtree(self.exit_dir(), ignore_errors=True)


def steps_gpu_inventory(record: dict[str, Any]) -> dict[str, Any] | None:
    """The GPU inventory of a step task in a dump's step record (None: no task had GPU
    state): the image's manifest records it when the batch tree itself has none."""
    for meta in record.values():
        for inventory in (meta.get("gpu") or {}).values() if isinstance(meta, dict) else ():
            if isinstance(inventory, dict):
                return inventory
    return None


def _rank_gpu(meta: dict[str, Any]) -> dict[int, dict[str, Any]]:
    gpu = meta.get("gpu")
    if not isinstance(gpu, dict):
        return {}
    return {int(rank): inv for rank, inv in gpu.items() if str(rank).isdigit() and isinstance(inv, dict)}


# ---------------------------------------------------------------- agent entry points

def handle_srun(services: NodeServices, conn: socket.socket, pid: int, uid: int, message: dict,
                fds: list[int]) -> None:
    """A stand-in asks for a step: only from inside the tree of a job supervised here."""
    job_id = str(message.get("job_id", ""))
    sup = services.jobs.get(job_id)
    if sup is None or sup.req.uid != uid or sup.tree is None or pid not in tree_pids(sup.tree.init_pid):
        protocol.send(conn, {"op": "unprotected"})
        return
    if sup.steps.job_reason:
        protocol.send(conn, {"op": "unprotected"})
        return
    argv, env, cwd = message.get("argv"), message.get("env"), message.get("cwd")
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv) and isinstance(env, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
            and isinstance(cwd, str) and len(fds) == 3):
        protocol.send(conn, {"op": "error", "message": "malformed srun request"})
        return
    if is_mpi_step(argv, env):  # Slurm starts MPI ranks itself; the job is refused checkpoints meanwhile
        protocol.send(conn, {"op": "unprotected"})
        return
    exit_file = sup.steps.jobsteps.start_srun(argv, env, cwd, fds, _ns_pid(pid))
    protocol.send(conn, {"op": "srun-started", "exit_file": str(exit_file)})


def step_task_job(pid: int) -> str | None:
    """Job id whose (non-batch) step `pid` is a task of, per the kernel's cgroup record."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        m = _STEP_CGROUP.search(line.split(":", 2)[-1])
        if m:
            return m.group(1)
    return None


def handle_task_start(services: NodeServices, conn: socket.socket, pid: int, uid: int, job_id: str,
                      message: dict, fds: list[int], admitted=lambda: None) -> None:
    sup = services.jobs.get(job_id)
    try:
        if sup is None or sup.req.uid != uid or str(message.get("job_id")) != job_id:
            raise PermissionDenied(f"job {job_id} has no slurm_mm-supervised batch tree of uid {uid} here")
        sup.steps.jobsteps.start_task(conn, pid, message, fds, admitted)
    except SlurmMMError as exc:
        log.warning("refused step task of job %s from pid %d: %s", job_id, pid, exc)
        for fd in fds:
            os.close(fd)
        protocol.send(conn, {"op": "refused", "message": str(exc)})


# ---------------------------------------------------------------- helpers

class KeptSrun:
    """A step's real srun as a Popen would show it: it runs under its keeper
    (slurm_mm/srun_keeper.py), whose end is srun's end; `pid` is srun's own."""

    def __init__(self, keeper: Any, args: list[str]) -> None:
        self.keeper, self.args = keeper, args

    @property
    def pid(self) -> int:
        keeper = self.keeper.pid
        try:
            with open(f"/proc/{keeper}/task/{keeper}/children", encoding="ascii") as f:
                children = f.read().split()
        except OSError:
            children = []
        return int(children[0]) if children else keeper

    def poll(self) -> int | None:
        return self.keeper.poll()

    def wait(self, timeout: float | None = None) -> int:
        try:
            return self.keeper.wait(timeout)
        except TimeoutError:  # an adopted keeper's
            raise subprocess.TimeoutExpired(self.args, timeout) from None

    def kill(self) -> None:
        """srun itself (its keeper then records 137), or the keeper when srun is gone."""
        pid = self.pid
        try:
            if pid == self.keeper.pid:
                self.keeper.kill()
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def srun_key(token: str) -> str:
    """The status file key of a step's srun keeper."""
    return f"srun-{token}"


def task_key(token: str, rank: int) -> str:
    """The status file key of a step task's tree."""
    return f"step-{token}-{int(rank)}"


def _stopped(pids: list[int]) -> set[int]:
    """Those of `pids` in a stopped state (T) now: a resume must not wake them."""
    found = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                    found.add(pid)
        except (OSError, IndexError):
            pass
    return found


def _ns_pid(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return 0


def _become(uid: int, gid: int, groups: list[int], cwd: str, cgroup_procs: list[Path]):
    """For the child only: join the job's cgroups, drop to the user, then enter cwd."""
    def run() -> None:
        for procs in cgroup_procs:
            try:
                with open(procs, "w") as handle:
                    handle.write("0")
            except OSError:
                pass
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
        os.chdir(cwd)
    return run


_SYS_PIDFD_GETFD = 438


def _fds_of(pid: int) -> list[int] | None:
    """Copies of fds 0-2 of `pid` (the restored stand-in's stdio: the relaunched srun's)."""
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    got: list[int] = []
    try:
        for fd in (0, 1, 2):
            new = libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
            if new < 0:
                for g in got:
                    os.close(g)
                return None
            got.append(new)
        return got
    finally:
        os.close(pidfd)


def _install_standin(bin_dir: Path) -> None:
    """`srun` in a root-owned directory: the stand-in, run by the agent's own Python."""
    import sys  # noqa: PLC0415

    target = bin_dir / "srun"
    text = f"#!/bin/sh\nexec {sys.executable} -I -m slurm_mm.step_client \"$@\"\n"
    if target.exists() and target.read_text() == text:
        return
    bin_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    tmp = bin_dir / f".srun.{os.getpid()}"
    tmp.write_text(text)
    os.chmod(tmp, 0o755)
    os.rename(tmp, target)
