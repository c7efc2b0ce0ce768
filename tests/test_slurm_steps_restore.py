"""Single-node `srun` steps are part of an enrolled job's checkpoint: the four shapes of
batch script (srun -n1; srun -n4 of a non-MPI program; sequential steps; a background
step while the script works) are preempted to another node and resume, each workload
judging its own result (hash chains in memory, step logs with no gap or repeat)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import testcluster as tc
from slurm_jobs import (WORKLOAD, as_user, assert_no_lost_or_repeated_steps, image_names, logged_steps,
                        output, preempt_to_another_node, user_processes)
from workloads.chain_job import chain
from workloads import stream_pair

pytestmark = pytest.mark.cluster
PY = "/usr/bin/python3"


def submit(cluster, job_dir: Path, body: str, *options: str, interval: str = "10m") -> str:
    shutil.copy(WORKLOAD, job_dir / "chain_job.py")
    user = pwd.getpwnam(tc.USER)
    os.chown(job_dir / "chain_job.py", user.pw_uid, user.pw_gid)
    # The script body lives on the shared filesystem: bash keeps its script open, and the
    # copy in slurmd's node-local spool directory does not exist on the next node.
    (job_dir / "job.sh").write_text(f"cd {job_dir}\n{body}")
    os.chown(job_dir / "job.sh", user.pw_uid, user.pw_gid)
    script = f"#!/bin/bash\nexec /bin/bash {job_dir}/job.sh\n"
    opts = [*options, "-o", str(job_dir / "chain.out"), "-J", "steps", "-p", "low",
            f"--checkpoint-interval={interval}"]
    return tc.job_id(tc.sbatch(cluster, script, *opts, cwd=job_dir))


def preempt_and_finish(cluster, job_dir: Path, job: str, ready) -> dict[str, str]:
    """Preempt the job once `ready()`; it must come back on another node and end."""
    return preempt_to_another_node(cluster, job, job_dir, ready=ready, hold=40)


def results(job_dir: Path) -> list[str]:
    return [l.split()[0] for l in output(job_dir).splitlines() if l.startswith("result=")]


STREAM_LINES = 10000


def submit_stream(cluster, job_dir: Path, interval: str = "10m") -> str:
    """`srun producer | the script's own consumer`: the stream must come through whole."""
    shutil.copy(stream_pair.__file__, job_dir / "stream_pair.py")
    user = pwd.getpwnam(tc.USER)
    os.chown(job_dir / "stream_pair.py", user.pw_uid, user.pw_gid)
    body = ('echo "start $SLURM_JOB_ID $SLURMD_NODENAME" >> starts.txt\n'
            f"srun -n1 {PY} stream_pair.py produce {STREAM_LINES} 0.02 | {PY} stream_pair.py consume stream.out\n"
            'echo "pipeline rc=${PIPESTATUS[*]}"\n')
    return submit(cluster, job_dir, body, interval=interval)


def consumed(job_dir: Path) -> int:
    try:
        return int((job_dir / "progress.txt").read_text() or 0)
    except (OSError, ValueError):
        return 0


def assert_stream_whole(job_dir: Path, info: dict[str, str]) -> None:
    out = output(job_dir)
    assert info["JobState"] == "COMPLETED", out
    assert "restored task 0 of step" in out, out
    assert (job_dir / "stream.out").read_text() == stream_pair.expected(STREAM_LINES), out
    assert len((job_dir / "starts.txt").read_text().splitlines()) == 1, out
    assert out.count("pipeline rc=0 0") == 1, out


def test_srun_step_piped_into_the_script_resumes_whole_after_preemption(cluster, job_dir):
    job = submit_stream(cluster, job_dir)
    info = preempt_and_finish(cluster, job_dir, job, lambda: consumed(job_dir) >= 2000)
    assert_stream_whole(job_dir, info)


def kill_node_until_the_job_ends(cluster, job: str, node: str) -> dict:
    """The job's node dies; the requeued job runs to its end elsewhere; the node comes back."""
    tc.kill_node(cluster, node)
    try:
        tc.wait_for(lambda: tc.job_info(cluster, job).get("Restarts") == "1", 90, "the requeue")
        return tc.wait_job(cluster, job, {"COMPLETED", "FAILED"}, timeout=150)
    finally:
        tc.start_node(cluster, node)
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], env=cluster.env(),
                       capture_output=True)


def test_srun_step_piped_into_the_script_resumes_whole_from_a_periodic_image(cluster, job_dir):
    job = submit_stream(cluster, job_dir, interval="5s")
    node = tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)["BatchHost"]
    tc.wait_for(lambda: len(image_names(cluster, job)) >= 2 and consumed(job_dir) >= 2000, 60,
                "periodic images with the stream under way")
    info = kill_node_until_the_job_ends(cluster, job, node)
    assert info["BatchHost"] != node, info
    assert_stream_whole(job_dir, info)


def test_srun_n1_job_resumes_its_step_on_another_node(cluster, job_dir):
    job = submit(cluster, job_dir, f"srun -n1 {PY} chain_job.py 100 0.25 chain.log\necho script-after-step rc=$?\n")
    info = preempt_and_finish(cluster, job_dir, job, lambda: len(logged_steps(job_dir)) >= 12)
    out = output(job_dir)
    assert info["JobState"] == "COMPLETED", out
    assert "restored task 0 of step" in out, out
    assert results(job_dir) == [f"result={chain(100)}"], out
    assert_no_lost_or_repeated_steps(job_dir, 100)
    assert out.count("script-after-step rc=0") == 1, out


def test_srun_n4_of_a_plain_program_resumes_all_tasks(cluster, job_dir):
    body = (f"srun -O -n4 bash -c 'exec {PY} chain_job.py 60 0.25 chain.$SLURM_PROCID.log'\n"
            "echo script-after-step rc=$?\n")
    job = submit(cluster, job_dir, body)
    info = preempt_and_finish(cluster, job_dir, job,
                              lambda: all(len(logged_steps(job_dir, f"chain.{r}")) >= 8 for r in range(4)))
    out = output(job_dir)
    assert info["JobState"] == "COMPLETED", out
    assert all(f"restored task {r} of step" in out for r in range(4)), out
    assert results(job_dir) == [f"result={chain(60)}"] * 4, out
    for r in range(4):
        assert logged_steps(job_dir, f"chain.{r}") == list(range(1, 61))
    assert out.count("script-after-step rc=0") == 1, out


def test_sequential_steps_resume_the_one_running(cluster, job_dir):
    body = (f"srun -n1 {PY} chain_job.py 20 0.05 first.log || exit 1\n"
            f"srun -n1 {PY} chain_job.py 100 0.25 chain.log\necho script-after-steps rc=$?\n")
    job = submit(cluster, job_dir, body)
    info = preempt_and_finish(cluster, job_dir, job, lambda: len(logged_steps(job_dir)) >= 12)
    out = output(job_dir)
    assert info["JobState"] == "COMPLETED", out
    assert results(job_dir) == [f"result={chain(20)}", f"result={chain(100)}"], out
    assert logged_steps(job_dir, "first") == list(range(1, 21))
    assert_no_lost_or_repeated_steps(job_dir, 100)
    assert out.count("script-after-steps rc=0") == 1, out


def test_background_step_and_the_script_s_own_work_both_resume(cluster, job_dir):
    body = (f"srun -n1 {PY} chain_job.py 100 0.25 chain.log &\n"
            f"{PY} chain_job.py 70 0.25 main.log\nwait $!\necho background rc=$?\n")
    job = submit(cluster, job_dir, body)
    info = preempt_and_finish(cluster, job_dir, job, lambda: len(logged_steps(job_dir)) >= 12)
    out = output(job_dir)
    assert info["JobState"] == "COMPLETED", out
    assert sorted(results(job_dir)) == sorted([f"result={chain(100)}", f"result={chain(70)}"]), out
    assert logged_steps(job_dir, "main") == list(range(1, 71))
    assert_no_lost_or_repeated_steps(job_dir, 100)
    assert out.count("background rc=0") == 1, out


def test_step_that_cannot_come_back_fails_the_job_with_the_reason(cluster, job_dir):
    # The step is pinned to the node it started on: on another node its srun cannot run,
    # and the script (which ignores srun's exit code) must not go on as if it had.
    body = f"srun -w $SLURMD_NODENAME -n1 {PY} chain_job.py 100 0.25 chain.log\necho script-went-on\n"
    job = submit(cluster, job_dir, body)
    info = preempt_and_finish(cluster, job_dir, job, lambda: len(logged_steps(job_dir)) >= 12)
    out = output(job_dir)
    assert info["JobState"] == "FAILED", out
    assert "error: step `srun -w n" in out and "before its task(s) [0] were restored" in out, out
    assert "failing the job instead of reporting its lost work as done" in out
    assert "script-went-on" not in out and results(job_dir) == [], out


def test_step_exit_code_reaches_the_script(cluster, job_dir):
    body = "srun -n1 sh -c 'echo in-step; exit 7'\necho srun-rc=$?\nexit 3\n"
    job = submit(cluster, job_dir, body)
    info = tc.wait_job(cluster, job, {"COMPLETED", "FAILED"}, timeout=60)
    out = output(job_dir)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0", info
    assert "in-step" in out and "srun-rc=7" in out, out


def test_scancel_ends_a_job_and_its_step(cluster, job_dir):
    job = submit(cluster, job_dir, f"srun -n1 {PY} chain_job.py 400 0.25 chain.log\n")
    tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)
    tc.wait_for(lambda: len(logged_steps(job_dir)) >= 4, 30, "progress")
    task = "chain_job.py 400 0.25"  # the step's command line (run from job_dir)
    assert user_processes(task)
    subprocess.run(["scancel", job], env=cluster.env(), check=True)
    info = tc.wait_job(cluster, job, {"CANCELLED"}, timeout=60)
    assert info["JobState"] == "CANCELLED"
    tc.wait_for(lambda: not user_processes(task), 30, "the step's task gone")
    done = len(logged_steps(job_dir))
    time.sleep(2)
    assert len(logged_steps(job_dir)) == done


def test_scancel_ends_a_restored_job_and_its_restored_step(cluster, job_dir):
    job = submit(cluster, job_dir, f"srun -n1 {PY} chain_job.py 401 0.25 chain.log\n")
    tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)
    tc.wait_for(lambda: len(logged_steps(job_dir)) >= 4, 30, "progress")
    res = as_user(cluster, "slurm-mm", "checkpoint", job, "--requeue")
    assert res.returncode == 0, res.stdout + res.stderr
    tc.wait_for(lambda: "restored task 0 of step" in output(job_dir), 60, "the step's restore")
    task = "chain_job.py 401 0.25"  # the restored task keeps its command line
    assert user_processes(task)
    assert as_user(cluster, "scancel", job).returncode == 0
    info = tc.wait_job(cluster, job, {"CANCELLED"}, timeout=30)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "1"
    tc.wait_for(lambda: not user_processes(task), 20, "the restored task gone")
    done = len(logged_steps(job_dir))
    time.sleep(2)
    assert len(logged_steps(job_dir)) == done


def test_steps_of_every_shape_resume_from_a_periodic_image_after_a_node_failure(cluster, job_dir):
    # One job, the three other shapes at once: a step that finished before the image (a
    # sequential one), a two-task step started in the background, and the script's own work
    # beside it. Periodic images hold them all; the node dies; the last image comes back.
    body = (f"srun -n1 {PY} chain_job.py 10 0.05 first.log || exit 1\n"
            f"srun -O -n2 bash -c 'exec {PY} chain_job.py 120 0.25 chain.$SLURM_PROCID.log' &\n"
            f"{PY} chain_job.py 90 0.25 main.log\nwait $!\necho background rc=$?\n")
    job = submit(cluster, job_dir, body, interval="5s")
    node = tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)["BatchHost"]
    tc.wait_for(lambda: len(image_names(cluster, job)) >= 2 and len(logged_steps(job_dir, "chain.1")) >= 8,
                60, "periodic images with the steps under way")
    info = kill_node_until_the_job_ends(cluster, job, node)
    out = output(job_dir)
    assert info["JobState"] == "COMPLETED" and info["BatchHost"] != node, out
    assert "restored task 0 of step" in out and "restored task 1 of step" in out, out
    assert sorted(results(job_dir)) == sorted([f"result={chain(10)}", f"result={chain(90)}"]
                                              + [f"result={chain(120)}"] * 2), out
    assert logged_steps(job_dir, "first") == list(range(1, 11))  # finished before: not run again
    for name, steps in (("chain.0", 120), ("chain.1", 120), ("main", 90)):
        logged = logged_steps(job_dir, name)
        assert sorted(set(logged)) == list(range(1, steps + 1)), (name, logged)  # none skipped
        assert len(logged) - steps <= 5 / 0.25 + 8, (name, logged)  # at most an interval redone
    assert out.count("background rc=0") == 1, out


def test_owner_requeue_of_a_job_with_a_step_reruns_it_once(cluster, job_dir):
    # Not a preemption: the step ends with SIGTERM and the script with 143, which the agent
    # must pass on (Slurm requeues the job), not read as a preemption and requeue once more.
    job = submit(cluster, job_dir, f"srun -n1 {PY} chain_job.py 60 0.1 chain.log\necho step rc=$?\n")
    tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)
    tc.wait_for(lambda: len(logged_steps(job_dir)) >= 10, 30, "progress")
    res = as_user(cluster, "scontrol", "requeue", job)
    assert res.returncode == 0, res.stdout + res.stderr
    info = tc.wait_job(cluster, job, {"COMPLETED", "FAILED"}, timeout=120)
    time.sleep(3)  # an extra requeue would show now
    info = tc.job_info(cluster, job)
    out = output(job_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, out)
    assert "being preempted" not in out and "requeueing" not in out, out
    assert results(job_dir) == [f"result={chain(60)}"], out  # the rerun's; the first run was cut short
    logged = logged_steps(job_dir)
    assert logged[-60:] == list(range(1, 61)) and logged[:-60] == list(range(1, len(logged) - 59)), logged


def test_srun_job_moves_off_a_drained_node_with_its_step(cluster, job_dir):
    job = submit(cluster, job_dir, f"srun -n1 {PY} chain_job.py 100 0.25 chain.log\n")
    node = tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)["BatchHost"]
    tc.wait_for(lambda: len(logged_steps(job_dir)) >= 10, 30, "progress")
    try:
        res = subprocess.run(["slurm-mm", "drain", node, "--reason", "steps test", "--timeout", "60"],
                             env=cluster.env(), capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        info = tc.wait_job(cluster, job, {"COMPLETED", "FAILED"}, timeout=150)
    finally:
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], env=cluster.env(),
                       capture_output=True)
    out = output(job_dir)
    assert info["JobState"] == "COMPLETED" and info["BatchHost"] != node, out
    assert "for drain" in out and "restored task 0 of step" in out, out
    assert results(job_dir) == [f"result={chain(100)}"], out
    assert_no_lost_or_repeated_steps(job_dir, 100)
