"""A restarted node agent takes over the `srun` steps of the jobs it takes over.

What outlives the agent: each step's srun keeper (slurm_mm/srun_keeper.py, the real
srun's parent, which records srun's exit code), each step task's tree (mm-init, which
records the task's end) and each task's `slurm-mm-run`, which reconnects as the batch
task does. The job's record (agent/job_records.py) lists its steps; when the batch task
has been taken over (agent/adopt.py), `adopt_steps` rebuilds them: the keeper is waited
on through a pidfd and its recorded code goes to the stand-in's exit file as before.
A task's `reattach` then finds its step and rank among them and relays again.

Runs as root. The step list comes from the agent's own records, each PID re-checked
against its kernel start time; a task's job comes from its cgroup (the kernel), and its
token and rank only select among that job's steps, as at start.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from slurm_mm.agent import job_records, protocol
from slurm_mm.agent.adopted import AdoptedTree, continue_stopped
from slurm_mm.agent.cgroups import step_cgroup_procs
from slurm_mm.agent.job_record import ACTIVE, LaunchRequest
from slurm_mm.agent.services import NodeServices, SupervisedJob
from slurm_mm.agent.step_launch import TOKEN_ENV, Step, StepTask, srun_key, task_key
from slurm_mm.errors import PermissionDenied, SlurmMMError

log = logging.getLogger(__name__)
FIND_SECONDS = 30.0  # a task may reconnect before its batch task has been taken over


def adopt_steps(sup: SupervisedJob, steps: dict[str, Any], records: job_records.JobRecords) -> list[str]:
    """Rebuild the job's recorded steps on its adopting supervisor; their tokens. A step
    whose keeper is gone (or whose record is malformed) is left out: its stand-in then
    waits as it would for a step that never ends, so the script's time limit ends it."""
    jobsteps = sup.steps.jobsteps
    adopted = []
    for token, meta in steps.items():
        try:
            keeper_pid, keeper_start = (int(x) for x in meta["srun"])
            step = Step(str(token), list(meta["argv"]), dict(meta["env"]), str(meta["cwd"]),
                        int(meta["standin_ns_pid"]), ntasks=int(meta.get("ntasks", 0)))
            keeper = AdoptedTree.of_pids(sup.job_id, records, keeper_pid, keeper_start, keeper_pid, keeper_start,
                                         key=srun_key(step.token))
            if keeper.waiter_fd is None and records.exit_status(sup.job_id, srun_key(step.token)) is None:
                log.warning("job %s: step %s's srun is gone and recorded no exit code", sup.job_id, token)
                continue
            for rank, pids in dict(meta.get("tasks", {})).items():
                init_pid, init_start, waiter_pid, waiter_start = (int(x) for x in pids)
                tree = AdoptedTree.of_pids(sup.job_id, records, init_pid, init_start, waiter_pid, waiter_start,
                                           key=task_key(step.token, int(rank)))
                step.tasks[int(rank)] = StepTask(int(rank), tree, None)  # req: once its task reattaches
                if tree.init_fd is not None and continue_stopped(init_pid):
                    log.warning("job %s: continued task %s of step %s, left stopped by the interrupted agent",
                                sup.job_id, rank, token)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("job %s: cannot take over step %r: malformed record (%s)", sup.job_id, token, exc)
            continue
        step.proc = keeper  # type: ignore[assignment]  # waited on as a Popen is
        with jobsteps.lock:
            jobsteps.steps[step.token] = step
        jobsteps.watch_srun(step)
        adopted.append(step.token)
    if adopted:
        log.info("job %s: took over step(s) %s", sup.job_id, ", ".join(adopted))
    return adopted


def handle_task_reattach(services: NodeServices, conn: socket.socket, pid: int, uid: int, job_id: str,
                         message: dict, fds: list[int], admitted) -> None:
    """A step task whose agent restarted: hand it its tree again."""
    try:
        sup, step, task = _find_task(services, uid, job_id, message)
        argv, env, cwd = message.get("argv"), message.get("env"), message.get("cwd")
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)
                and isinstance(env, dict) and isinstance(cwd, str) and len(fds) == 3):
            raise PermissionDenied("step task reattach request is malformed")
        req = sup.req
        task.stdio = list(fds)
        task.req = LaunchRequest(job=req.job, uid=req.uid, gid=req.gid, groups=req.groups, argv=argv, env=env,
                                 cwd=cwd, stdio=fds, cgroup_procs=step_cgroup_procs(pid), interval=0)
    except SlurmMMError as exc:
        log.warning("refused reattach of a step task of job %s from pid %d: %s", job_id, pid, exc)
        for fd in fds:
            os.close(fd)
        protocol.send(conn, {"op": "refused", "message": str(exc)})
        return
    log.info("job %s: took over task %d of step %s", job_id, task.rank, step.token)
    sup.steps.jobsteps.attach_task(conn, step, task, fds, admitted, "reattached")


def _find_task(services: NodeServices, uid: int, job_id: str, message: dict):
    """The adopted task the message names (its batch task may still be reconnecting)."""
    env = message.get("env") if isinstance(message.get("env"), dict) else {}
    token = str(env.get(TOKEN_ENV, ""))
    try:
        rank = int(env.get("SLURM_PROCID", ""))
    except ValueError:
        raise PermissionDenied("step task has no valid SLURM_PROCID") from None
    deadline = time.monotonic() + FIND_SECONDS
    while True:
        sup = services.jobs.get(job_id)
        if sup is not None and (sup.req.uid != uid or str(message.get("job_id")) != job_id):
            raise PermissionDenied(f"job {job_id} has no slurm_mm-supervised batch tree of uid {uid} here")
        if sup is not None and sup.record.state in ACTIVE:
            jobsteps = sup.steps.jobsteps
            with jobsteps.lock:
                step = jobsteps.steps.get(token)
                task = step.tasks.get(rank) if step is not None else None
            if task is not None:
                if task.req is not None:
                    raise PermissionDenied(f"task {rank} of step {token} of job {job_id} is already attached")
                return sup, step, task
        if time.monotonic() >= deadline:
            raise PermissionDenied(f"job {job_id} has no step task {token}/{rank} to take over here")
        time.sleep(0.2)
