"""Enrolled jobs on the real 3-node cluster: periodic images, requeue, preemption,
drain, node failure, scancel, exit codes. Every job is the self-checking chain job:
its final hash equals an uninterrupted run's only if no work was lost or repeated."""

from __future__ import annotations

import subprocess

import pytest

from conftest import testcluster as tc
from slurm_jobs import (as_user, assert_correct_result, assert_no_lost_or_repeated_steps,
                        image_names, logged_steps, output, preempt_to_another_node, submit_chain,
                        user_processes)

pytestmark = pytest.mark.cluster


def scontrol(cluster, *args: str, check: bool = True) -> None:
    subprocess.run(["scontrol", *args], env=cluster.env(), check=check, capture_output=True)


def resume_node(cluster, node: str) -> None:
    """Back to service (no-op if it already is: RESUME on an idle node is refused)."""
    scontrol(cluster, "update", f"NodeName={node}", "State=RESUME", check=False)
    tc.wait_for(lambda: tc.node_states(cluster).get(node) in ("idle", "mix", "alloc"), 60, f"{node} back")


def test_periodic_images_while_job_keeps_running(cluster, job_dir):
    job = submit_chain(cluster, job_dir, steps=60, delay=0.25, interval="5s")
    tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)
    tc.wait_for(lambda: len(image_names(cluster, job)) >= 2, 30, "two periodic images")
    assert tc.job_info(cluster, job)["JobState"] == "RUNNING"
    info = tc.wait_job(cluster, job, {"COMPLETED", "FAILED"}, timeout=60)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0"
    assert_correct_result(job_dir, 60)
    assert_no_lost_or_repeated_steps(job_dir, 60)  # leave-running dumps cost no step
    # A completed job's images are removed by the epilog.
    tc.wait_for(lambda: not (cluster.checkpoint_root / job).exists(), 20, "images removed")


def test_owner_checkpoint_requeue_resumes_without_lost_work(cluster, job_dir):
    job = submit_chain(cluster, job_dir, steps=80, delay=0.25, interval="10m")
    tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)
    tc.wait_for(lambda: len(logged_steps(job_dir)) >= 10, 30, "10 steps")
    res = as_user(cluster, "slurm-mm", "checkpoint", job, "--requeue")
    assert res.returncode == 0, res.stderr
    assert "checkpointed and requeued" in res.stdout
    tc.wait_for(lambda: tc.job_info(cluster, job).get("Restarts") == "1", 30, "requeue")
    info = tc.wait_job(cluster, job, {"COMPLETED", "FAILED"}, timeout=120)
    assert info["JobState"] == "COMPLETED"
    assert "slurm_mm: restored from ckpt-" in output(job_dir)
    assert_correct_result(job_dir, 80)
    assert_no_lost_or_repeated_steps(job_dir, 80)


def test_preempted_job_resumes_on_another_node(cluster, job_dir):
    job = submit_chain(cluster, job_dir, 120, 0.25, "-p", "low", interval="10m")
    info = preempt_to_another_node(cluster, job, job_dir, ready=lambda: len(logged_steps(job_dir)) >= 10)
    assert info["JobState"] == "COMPLETED"
    assert "for preempt" in output(job_dir)
    assert_correct_result(job_dir, 120)
    assert_no_lost_or_repeated_steps(job_dir, 120)


def test_drain_moves_two_enrolled_jobs_off_the_node(cluster, job_dir):
    # Park n2 and n3 so both jobs start on n1 without being pinned to it (-w would
    # follow them through the requeue).
    scontrol(cluster, "update", "NodeName=n2,n3", "State=DRAIN", "Reason=test-parking")
    try:
        jobs = [submit_chain(cluster, job_dir, 100, 0.25, interval="10m", name=f"j{i}") for i in range(2)]
        for job in jobs:
            assert tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)["BatchHost"] == "n1"
    finally:
        resume_node(cluster, "n2")
        resume_node(cluster, "n3")
    tc.wait_for(lambda: all(len(logged_steps(job_dir, f"j{i}")) >= 8 for i in range(2)), 30, "progress")
    try:
        res = subprocess.run(["slurm-mm", "drain", "n1", "--reason", "disk swap", "--timeout", "60"],
                             env=cluster.env(), capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "requeued" in res.stdout
        node = tc.node_states(cluster)["n1"]
        assert node in ("drain", "drng", "drained"), node
        for i, job in enumerate(jobs):
            info = tc.wait_job(cluster, job, {"COMPLETED", "FAILED"}, timeout=150)
            assert info["JobState"] == "COMPLETED" and info["BatchHost"] != "n1", info
            assert "for drain" in output(job_dir, f"j{i}")
            assert_correct_result(job_dir, 100, f"j{i}")
            assert_no_lost_or_repeated_steps(job_dir, 100, f"j{i}")
    finally:
        resume_node(cluster, "n1")


def test_node_failure_resumes_from_last_periodic_image(cluster, job_dir):
    job = submit_chain(cluster, job_dir, steps=160, delay=0.25, interval="5s")
    node = tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)["BatchHost"]
    tc.wait_for(lambda: len(image_names(cluster, job)) >= 2, 30, "periodic images")
    steps_before = len(logged_steps(job_dir))
    tc.kill_node(cluster, node)
    try:
        info = tc.wait_job(cluster, job, {"RUNNING"}, timeout=120, node_not=node)
        assert info["Restarts"] == "1"
        info = tc.wait_job(cluster, job, {"COMPLETED", "FAILED"}, timeout=120)
    finally:
        tc.start_node(cluster, node)
        resume_node(cluster, node)
    assert info["JobState"] == "COMPLETED"
    assert "slurm_mm: restored from ckpt-" in output(job_dir)
    assert_correct_result(job_dir, 160)
    steps = logged_steps(job_dir)
    # Work after the last image was redone (<= one interval), nothing skipped.
    assert sorted(set(steps)) == list(range(1, 161))
    assert len(steps) - 160 <= 5 / 0.25 + 4 and steps_before > 0


def test_scancel_kills_a_restored_job(cluster, job_dir):
    job = submit_chain(cluster, job_dir, steps=400, delay=0.25, interval="10m")
    tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)
    tc.wait_for(lambda: len(logged_steps(job_dir)) >= 4, 30, "progress")
    assert as_user(cluster, "slurm-mm", "checkpoint", job, "--requeue").returncode == 0
    tc.wait_for(lambda: "restored from" in output(job_dir), 60, "restore")
    assert user_processes(f"{job_dir}/chain_job.py")
    assert as_user(cluster, "scancel", job).returncode == 0
    info = tc.wait_job(cluster, job, {"CANCELLED"}, timeout=30)
    assert info["JobState"] == "CANCELLED"
    tc.wait_for(lambda: not user_processes(f"{job_dir}/chain_job.py"), 20, "restored tree to die")


def test_exit_code_passes_through(cluster, job_dir):
    job = submit_chain(cluster, job_dir, steps=4, delay=0.1, exit_code=3, interval="10m")
    info = tc.wait_job(cluster, job, {"COMPLETED", "FAILED"}, timeout=60)
    assert info["JobState"] == "FAILED"
    assert info["ExitCode"] == "3:0"
    assert_correct_result(job_dir, 4)
    # It ended for good: the Epilog removes what slurm_mm made for it (nothing left to resume).
    tc.wait_for(lambda: not (cluster.checkpoint_root / job).exists(), 30, "the Epilog's cleanup")


def test_job_without_option_is_untouched(cluster, job_dir):
    script = "#!/bin/sh\ncat /proc/$$/status | grep -E '^(NSpid|PPid)'\nps -o comm= -p $PPID\n"
    job = tc.job_id(tc.sbatch(cluster, script, "-o", str(job_dir / "plain.out"), cwd=job_dir))
    info = tc.wait_job(cluster, job, {"COMPLETED", "FAILED"}, timeout=60)
    assert info["JobState"] == "COMPLETED"
    text = (job_dir / "plain.out").read_text()
    assert "slurmstepd" in text          # the script's parent is Slurm's, not mm-init
    assert "slurm_mm" not in text
    nspid = [l for l in text.splitlines() if l.startswith("NSpid")][0].split()[1:]
    assert len(nspid) == 1               # no PID namespace of slurm_mm's
    assert not (cluster.checkpoint_root / job).exists()


def test_job_in_its_own_mount_namespace_requeues_and_resumes(cluster, job_dir):
    """The layout GPU nodes use (own mount namespace and /proc, docs/gpu-validation.md)."""
    tc.set_agent_config(cluster, "job_mount_namespace", "always")
    try:
        job = submit_chain(cluster, job_dir, 60, 0.25, interval="10m")
        tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)
        tc.wait_for(lambda: len(logged_steps(job_dir)) >= 6, 30, "progress")
        procs = [p for p in user_processes(f"{job_dir}/chain_job.py")]
        pid = int(procs[0].split()[0])
        ns_procs = subprocess.run(["nsenter", "-t", str(pid), "-m", "ls", "/proc"],
                                  capture_output=True, text=True).stdout.split()
        assert len([p for p in ns_procs if p.isdigit()]) <= 4  # its own /proc: init, sh/python
        assert as_user(cluster, "slurm-mm", "checkpoint", job, "--requeue").returncode == 0
        info = tc.wait_job(cluster, job, {"COMPLETED", "FAILED"}, timeout=120)
        assert info["JobState"] == "COMPLETED" and "restored from" in output(job_dir)
        assert_correct_result(job_dir, 60)
        assert_no_lost_or_repeated_steps(job_dir, 60)
    finally:
        tc.set_agent_config(cluster, "job_mount_namespace", "never")


def test_short_staging_space_falls_back_to_direct_mode(cluster, job_dir):
    """No room on node-local staging: the dump goes to the shared filesystem instead."""
    tc.set_agent_config(cluster, "staging_min_free_ratio", "0.9999")
    try:
        job = submit_chain(cluster, job_dir, 40, 0.25, interval="5s")
        node = tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)["BatchHost"]
        tc.wait_for(lambda: len(image_names(cluster, job)) >= 1, 30, "an image")
        log = (cluster.log / f"agent-{node}.log").read_text()
        assert f"job {job}: " in log and "dumping to the shared filesystem" in log
        info = tc.wait_job(cluster, job, {"COMPLETED", "FAILED"}, timeout=60)
        assert info["JobState"] == "COMPLETED"
        assert_correct_result(job_dir, 40)
        assert not list((cluster.checkpoint_root / ".staging").rglob("dump-*"))  # cleaned up
    finally:
        tc.set_agent_config(cluster, "staging_min_free_ratio", "0.1")


def test_jobs_that_end_at_once_complete(cluster, job_dir):
    """A job can end before the agent has said "started": the batch task must still exit."""
    jobs = [tc.job_id(tc.sbatch(cluster, "#!/bin/sh\ntrue\n", "--checkpoint-interval=10m",
                                "-o", "/dev/null", cwd=job_dir)) for _ in range(8)]
    for job in jobs:
        info = tc.wait_job(cluster, job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=60)
        assert info["JobState"] == "COMPLETED", info
