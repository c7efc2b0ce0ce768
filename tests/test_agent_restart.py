"""A restart (or upgrade) of the node agent never fails a job: the jobs' trees run on,
their batch tasks (and `srun` step tasks) reconnect, and the new agent takes them over,
also when the restart cuts a checkpoint short. Every job is the self-checking chain job;
once the jobs are over, no record of them is left in the agent's run dir."""

from __future__ import annotations

import os
import pwd
import shutil
import time

import pytest

from conftest import testcluster as tc
from slurm_jobs import (WORKLOAD, as_user, assert_correct_result, assert_no_lost_or_repeated_steps,
                        image_names, logged_steps, output, submit_chain)

pytestmark = pytest.mark.cluster
TAKEN_OVER = "the restarted node agent took the job over"


def restart_agent(cluster, node: str) -> None:
    """As `systemctl restart` with KillMode=process: SIGTERM to the agent alone, then a new one.
    The agent goes at once, also mid-commit (no SIGKILL needed, as systemd's after 90 s)."""
    started = time.monotonic()
    tc.stop_pid(cluster.pid_file(f"agent-{node}"))
    assert time.monotonic() - started < 5, "the agent took its time to stop"
    tc.start_agent(cluster, node)


def records_left(cluster, node: str) -> list[str]:
    path = cluster.run / "jobs" / node
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def dump_in_progress(cluster, job: str) -> bool:
    staging = cluster.state / "staging" / job
    return staging.is_dir() and any(staging.glob("dump-*"))


def test_agent_restart_while_jobs_run_and_mid_checkpoint(cluster, job_dir):
    node = "n1"
    # a: launched, then requeued and restored (its tree's parent is then mm-init --keep)
    a = submit_chain(cluster, job_dir, 160, 0.25, "-w", node, interval="10m", name="a")
    # b: launched, checkpointed every 5 s
    b = submit_chain(cluster, job_dir, 200, 0.25, "-w", node, interval="5s", name="b")
    for job in (a, b):
        tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)
    tc.wait_for(lambda: len(logged_steps(job_dir, "a")) >= 8, 30, "a: 8 steps")
    res = as_user(cluster, "slurm-mm", "checkpoint", a, "--requeue")
    assert res.returncode == 0, res.stderr
    tc.wait_for(lambda: "slurm_mm: restored from ckpt-" in output(job_dir, "a"), 60, "a restored")

    restart_agent(cluster, node)  # both jobs running, no checkpoint in flight
    tc.wait_for(lambda: output(job_dir, "a").count(TAKEN_OVER) == 1
                and output(job_dir, "b").count(TAKEN_OVER) == 1, 30, "both jobs taken over")
    steps_a = len(logged_steps(job_dir, "a"))
    tc.wait_for(lambda: len(logged_steps(job_dir, "a")) > steps_a + 4, 20, "a goes on after the restart")

    before = image_names(cluster, b)
    tc.wait_for(lambda: dump_in_progress(cluster, b), 30, "a periodic checkpoint of b under way", interval=0.005)
    restart_agent(cluster, node)  # cuts b's checkpoint short
    after = image_names(cluster, b)
    assert set(before) <= set(after), (before, after)  # the previous image stays
    tc.wait_for(lambda: output(job_dir, "b").count(TAKEN_OVER) == 2, 30, "b taken over again")
    tc.wait_for(lambda: len(image_names(cluster, b)) > len(after) or
                tc.job_info(cluster, b).get("JobState") != "RUNNING", 30, "b checkpointed again")

    for job, name, steps in ((a, "a", 160), (b, "b", 200)):
        info = tc.wait_job(cluster, job, {"COMPLETED", "FAILED"}, timeout=120)
        assert info["JobState"] == "COMPLETED", output(job_dir, name)
        assert_correct_result(job_dir, steps, name)
        assert_no_lost_or_repeated_steps(job_dir, steps, name)  # one fresh start, no rerun
    assert tc.job_info(cluster, a)["Restarts"] == "1" and tc.job_info(cluster, b)["Restarts"] == "0"
    assert output(job_dir, "b").count("starting the job script") == 0

    tc.wait_for(lambda: not records_left(cluster, node), 10, "the jobs' records removed")


def test_agent_restart_while_an_srun_step_runs_and_mid_checkpoint(cluster, job_dir):
    node, steps = "n2", 200
    shutil.copy(WORKLOAD, job_dir / "chain_job.py")
    user = pwd.getpwnam(tc.USER)
    os.chown(job_dir / "chain_job.py", user.pw_uid, user.pw_gid)
    script = (f"#!/bin/bash\ncd {job_dir}\nsrun -n1 /usr/bin/python3 chain_job.py {steps} 0.25 chain.log\n"
              "echo script-after-step rc=$?\n")
    job = tc.job_id(tc.sbatch(cluster, script, "-w", node, "-o", str(job_dir / "chain.out"), "-J", "chain",
                              "--checkpoint-interval=5s", cwd=job_dir))
    tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)
    tc.wait_for(lambda: len(image_names(cluster, job)) >= 1, 30, "a first image with the step")

    restart_agent(cluster, node)  # the step runs, no checkpoint in flight
    tc.wait_for(lambda: output(job_dir).count(TAKEN_OVER) == 2, 30, "batch and step task taken over")
    done = len(logged_steps(job_dir))
    tc.wait_for(lambda: len(logged_steps(job_dir)) > done + 4, 20, "the step goes on after the restart")
    images = len(image_names(cluster, job))
    tc.wait_for(lambda: len(image_names(cluster, job)) > images, 30, "checkpointed again, step and all")

    tc.wait_for(lambda: dump_in_progress(cluster, job), 30, "a periodic checkpoint under way", interval=0.005)
    before = image_names(cluster, job)
    restart_agent(cluster, node)  # cuts the checkpoint short
    assert before[-1] in image_names(cluster, job)  # the newest image stays
    tc.wait_for(lambda: output(job_dir).count(TAKEN_OVER) == 4, 30, "taken over again")

    info = tc.wait_job(cluster, job, {"COMPLETED", "FAILED"}, timeout=120)
    out = output(job_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", out
    assert_correct_result(job_dir, steps)
    assert_no_lost_or_repeated_steps(job_dir, steps)  # one fresh start, no rerun
    assert out.count("script-after-step rc=0") == 1, out
    tc.wait_for(lambda: not records_left(cluster, node), 10, "the job's records removed")
