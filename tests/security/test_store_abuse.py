"""Finding: the image store could be abused. Images are root's, so user quotas never saw
them; a job that was not enrolled was served anyway by running `slurm-mm-run` by hand
(its images and markers were never cleaned); a failed or cancelled job kept its images
forever. Now: a per-user store quota, only jobs the Prolog marked enrolled are served,
and the Epilog removes a job's images once it ended for good (never on a requeue)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time

import pytest

from conftest import testcluster as tc
from slurm_jobs import as_user, assert_correct_result, image_names, logged_steps, output, submit_chain
from slurm_mm.agent import enrollment
from slurm_mm.agent.quota import StoreQuota
from slurm_mm.config import load
from slurm_mm.store import ImageStore

pytestmark = pytest.mark.cluster


def test_a_job_without_checkpoint_interval_is_not_served_by_a_hand_run_wrapper(cluster, job_dir):
    """The user runs the batch wrapper themselves, with the variables the plugin would set."""
    script = (f"#!/bin/bash\n"
              f"export SLURM_MM_SCRIPT=/bin/sleep SLURM_MM_CHECKPOINT_INTERVAL=5 "
              f"SLURM_MM_AGENT_SOCKET={cluster.run}/agent-%n.sock\n"
              f"/opt/slurm_mm/venv/bin/slurm-mm-run 8\n"
              f"echo wrapper-exit=$?\n")
    job = tc.job_id(tc.sbatch(cluster, script, "-o", str(job_dir / "chain.out"), cwd=job_dir))
    tc.wait_job(cluster, job, {"COMPLETED", "FAILED"}, timeout=60)
    text = output(job_dir)
    assert f"job {job} is not enrolled" in text and "wrapper-exit=1" in text, text
    assert not (cluster.checkpoint_root / job).exists(), "the agent made a store directory for it"


def test_store_quota_stops_new_images_and_the_job_runs_on(cluster, job_dir):
    uid = pwd.getpwnam(tc.USER).pw_uid
    store = ImageStore(cluster.checkpoint_root)
    # Earlier tests' jobs gone, Epilogs done: what the user holds no longer changes.
    tc.wait_for(lambda: not _queued(cluster), 90, "earlier jobs of the user to leave")
    # Room for what the user already holds from earlier jobs plus one byte: this job's
    # first image fits, nothing after it does.
    quota = StoreQuota(store, 1, 3).usage(uid) + 1
    tc.set_agent_config(cluster, "store_quota_per_user", str(quota))
    try:
        job = submit_chain(cluster, job_dir, steps=80, delay=0.25, interval="5s")
        tc.wait_for(lambda: len(image_names(cluster, job)) >= 1, 40, "the first periodic image")
        tc.wait_for(lambda: "store_quota_per_user" in output(job_dir), 30, "a refused periodic image")
        res = as_user(cluster, "slurm-mm", "checkpoint", job)
        assert res.returncode != 0 and "quota" in res.stderr and "Traceback" not in res.stderr, res
        tc.wait_job(cluster, job, {"COMPLETED"}, timeout=60)
        assert_correct_result(job_dir, 80)
        assert "periodic checkpoint failed" in output(job_dir) and "the job keeps running" in output(job_dir)
    finally:
        tc.set_agent_config(cluster, "store_quota_per_user", "0")


def _queued(cluster) -> str:
    return subprocess.run(["squeue", "-h", "-u", tc.USER], env=cluster.env(), capture_output=True,
                          text=True).stdout.strip()


def _fresh_dir(user_home, name: str):
    path = user_home / "tests" / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    pw = pwd.getpwnam(tc.USER)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    return path


def test_images_go_when_a_job_ends_for_good_and_stay_when_it_is_requeued(cluster, user_home):
    dirs = {name: _fresh_dir(user_home, f"store_end_{name}") for name in ("failed", "cancelled", "requeued")}
    failed = submit_chain(cluster, dirs["failed"], 60, 0.25, interval="5s", exit_code=3)
    cancelled = submit_chain(cluster, dirs["cancelled"], 400, 0.25, interval="5s")
    requeued = submit_chain(cluster, dirs["requeued"], 60, 0.25, "--open-mode=append", interval="10m")
    for job in (failed, cancelled):
        tc.wait_for(lambda j=job: len(image_names(cluster, j)) >= 1, 40, f"an image of {job}")
    tc.wait_for(lambda: len(logged_steps(dirs["requeued"])) >= 4, 40, "progress of the requeued job")
    # The owner's own Slurm requeue (the agent leaves no marker): the Epilog keeps the
    # images on Slurm's restart count alone.
    assert as_user(cluster, "slurm-mm", "checkpoint", requeued).returncode == 0
    assert as_user(cluster, "scontrol", "requeue", requeued).returncode == 0
    subprocess.run(["scancel", cancelled], env=cluster.env(), check=True)
    tc.wait_job(cluster, failed, {"FAILED"}, timeout=60)
    tc.wait_job(cluster, cancelled, {"CANCELLED"}, timeout=60)
    cfg = load(cluster.mm_config)
    for job in (failed, cancelled):
        tc.wait_for(lambda j=job: not (cluster.checkpoint_root / j).exists(), 30,
                    f"the epilog to remove {job}'s images")
        for node in tc.NODES:
            for kind in (enrollment.ENROLLED, enrollment.STARTED):
                assert not enrollment.marker_path(cfg, kind, job, node).exists()
    # The requeued job needs its image: it is restored from it and completes correctly.
    tc.wait_job(cluster, requeued, {"COMPLETED"}, timeout=120)
    assert "restored from ckpt-" in output(dirs["requeued"]), output(dirs["requeued"])
    assert_correct_result(dirs["requeued"], 60)
    tc.wait_for(lambda: not (cluster.checkpoint_root / requeued).exists(), 30, "the completed job's images to go")


def test_a_job_cancelled_while_pending_after_a_requeue_loses_its_images(cluster, user_home):
    """No Epilog sees such a job end: the agents' store sweep removes its images, while a
    held (pending) job keeps them."""
    tc.set_agent_config(cluster, "store_sweep_interval", "5")
    try:
        job_dir = _fresh_dir(user_home, "store_end_pending")
        job = submit_chain(cluster, job_dir, 400, 0.25, "--open-mode=append", interval="10m")
        tc.wait_for(lambda: len(logged_steps(job_dir)) >= 4, 40, "progress of the job")
        assert as_user(cluster, "slurm-mm", "checkpoint", job, "--requeue").returncode == 0
        tc.wait_for(lambda: as_user(cluster, "scontrol", "hold", job).returncode == 0, 20, "a hold on the job")
        tc.wait_job(cluster, job, {"PENDING"}, timeout=30)
        assert len(image_names(cluster, job)) == 1
        time.sleep(12)  # two sweeps or more: a held job can still run
        assert len(image_names(cluster, job)) == 1, "the sweep removed a pending job's image"
        subprocess.run(["scancel", job], env=cluster.env(), check=True)
        tc.wait_job(cluster, job, {"CANCELLED"}, timeout=30)
        tc.wait_for(lambda: not (cluster.checkpoint_root / job).exists(), 20,
                    "the store sweep to remove the cancelled job's images")
    finally:
        tc.set_agent_config(cluster, "store_sweep_interval", "300")
