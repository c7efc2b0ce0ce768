"""SUSPEND,GANG preemption and epoch fencing of a stale copy, on the real cluster."""

from __future__ import annotations

import subprocess
import time

import pytest

from conftest import testcluster as tc
from slurm_jobs import (assert_correct_result, assert_no_lost_or_repeated_steps, image_names,
                        logged_steps, output, submit_chain)
from slurm_mm.store import ImageStore

pytestmark = pytest.mark.cluster


@pytest.fixture()
def suspend_cluster(cluster):
    """The session cluster, restarted with PreemptMode=SUSPEND,GANG (and back after)."""
    tc.stop(cluster)
    tc.start(cluster, "suspend")
    yield cluster
    tc.stop(cluster)
    tc.start(cluster, "requeue")


def test_suspended_job_resumes_with_state_intact(suspend_cluster, job_dir):
    c = suspend_cluster
    job = submit_chain(c, job_dir, 100, 0.2, "-p", "low", interval="10m")
    node = tc.wait_job(c, job, {"RUNNING"}, timeout=30)["BatchHost"]
    tc.wait_for(lambda: len(logged_steps(job_dir)) >= 5, 30, "progress")
    urgent = tc.job_id(tc.sbatch(c, "#!/bin/sh\nsleep 12\n", "-p", "high", "-w", node, "--exclusive",
                                 "-o", "/dev/null", cwd=job_dir))
    tc.wait_job(c, job, {"SUSPENDED"}, timeout=30)
    # slurmd freezes the cgroup a moment (~2 s) after its SIGTSTP: wait until the log stands.
    def settled() -> bool:
        now = len(logged_steps(job_dir))
        time.sleep(1)
        return len(logged_steps(job_dir)) == now

    tc.wait_for(settled, 15, "the suspended job to stop logging")
    frozen_at = len(logged_steps(job_dir))
    time.sleep(4)  # an observation window, not a synchronisation: nothing may happen in it
    assert len(logged_steps(job_dir)) == frozen_at  # really stopped while suspended
    tc.wait_job(c, urgent, {"COMPLETED"}, timeout=60)
    info = tc.wait_job(c, job, {"COMPLETED", "FAILED"}, timeout=90)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0"
    assert_correct_result(job_dir, 100)
    assert_no_lost_or_repeated_steps(job_dir, 100)
    assert "checkpointed to" not in output(job_dir)  # suspend is not a requeue


def test_stale_copy_cannot_commit_after_requeue(cluster, job_dir):
    """Only slurmd dies (a network cut): the old copy runs on while Slurm runs the job
    elsewhere. Its periodic checkpoints must be fenced off."""
    job = submit_chain(cluster, job_dir, 600, 0.25, interval="5s")
    node = tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)["BatchHost"]
    tc.wait_for(lambda: len(image_names(cluster, job)) >= 1, 30, "a periodic image")
    slurmd = tc.read_pid(cluster.run / f"slurmd-{node}.pid")
    subprocess.run(["kill", "-9", str(slurmd)], check=True)
    try:
        info = tc.wait_job(cluster, job, {"RUNNING"}, timeout=120, node_not=node)
        assert info["Restarts"] == "1"
        restarted = time.time()
        store = ImageStore(cluster.checkpoint_root)
        # The new run commits; the stale copy's agent tries and is fenced off.
        tc.wait_for(lambda: any(i.manifest.epoch == 1 for i in store.images(job)), 30, "an epoch-1 image")
        tc.wait_for(lambda: "older than the fence" in (cluster.log / f"agent-{node}.log").read_text(),
                    30, "the stale copy to be fenced")
        time.sleep(6)  # one more period of both copies
        late = [i for i in store.images(job) if i.manifest.created > restarted and i.manifest.epoch == 0]
        assert late == []
        assert "older than the fence" in output(job_dir)
    finally:
        subprocess.run(["scancel", job], env=cluster.env())
        tc.kill_node(cluster, node)  # the stale copy goes with its node
        tc.start_node(cluster, node)
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"],
                       env=cluster.env(), capture_output=True)
        tc.wait_for(lambda: tc.node_states(cluster).get(node) == "idle", 60, f"{node} idle")
