"""Jobs slurm_mm cannot capture whole (multi-node allocations, running `srun` steps) on the
real cluster: told once, never given an image that loses work, rerun by a requeue, and
never ended COMPLETED without their result. Each job is the self-checking chain job."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import testcluster as tc
from slurm_jobs import (WORKLOAD, as_user, assert_correct_result, image_names, logged_steps, output,
                        preempt_to_another_node)
from workloads.chain_job import chain

pytestmark = pytest.mark.cluster


def _copy_workload(job_dir: Path) -> None:
    shutil.copy(WORKLOAD, job_dir / "chain_job.py")
    user = pwd.getpwnam(tc.USER)
    os.chown(job_dir / "chain_job.py", user.pw_uid, user.pw_gid)


def submit(cluster, job_dir: Path, script: str, *options: str, name: str = "chain"):
    _copy_workload(job_dir)
    opts = [*options, "-o", str(job_dir / f"{name}.out"), "-J", name]
    return tc.sbatch(cluster, script, *opts, cwd=job_dir)


def _restarted_log(job_dir: Path, steps: int) -> None:
    """A rerun from the start: the log is one partial run, then one whole run."""
    log = logged_steps(job_dir)
    assert log[-steps:] == list(range(1, steps + 1)), log
    first = log[:-steps]
    assert first == list(range(1, len(first) + 1)), log


def test_preempted_srun_job_reruns_and_completes_with_its_result(cluster, job_dir):
    steps = 100
    # Slurm's srun by its path, not the stand-in slurm_mm puts first on the PATH: a step
    # slurm_mm does not run, so it cannot carry it.
    script = f"#!/bin/bash\n/usr/bin/srun -n1 /usr/bin/python3 {job_dir}/chain_job.py {steps} 0.25 {job_dir}/chain.log\n"
    job = tc.job_id(submit(cluster, job_dir, script, "-p", "low", "--checkpoint-interval=5s"))
    tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)
    tc.wait_for(lambda: len(logged_steps(job_dir)) >= 40, 40, "40 steps (several intervals)")
    refused = "not checkpointed: srun step `/usr/bin/srun -n1 /usr/bin/python3"
    assert output(job_dir).count(refused) == 1, output(job_dir)  # told once, not every interval
    assert image_names(cluster, job) == []
    status = as_user(cluster, "slurm-mm", "status")
    assert "cannot checkpoint srun steps" in status.stdout, status.stdout + status.stderr
    info = preempt_to_another_node(cluster, job, job_dir)
    out = output(job_dir)
    assert info["JobState"] == "COMPLETED", out
    # Slurm < 24.05: the agent requeues ("requeueing the job ..."); 24.05+: Slurm's own
    # requeue of a job ending in its grace time ("Slurm requeues the job ...").
    assert "slurm_mm: preempt: " in out and "the job to rerun from the beginning" in out, out
    assert_correct_result(job_dir, steps)
    _restarted_log(job_dir, steps)


def test_multi_node_job_is_told_once_gets_no_images_and_slurm_reruns_it(cluster, job_dir):
    steps = 80
    script = (f"#!/bin/bash\nsrun -N2 -n2 --ntasks-per-node=1 /usr/bin/python3 {job_dir}/chain_job.py "
              f"{steps} 0.25 {job_dir}/chain.log\n")
    sub = submit(cluster, job_dir, script, "-N2", "-p", "low", "--checkpoint-interval=5s")
    assert "warning: --checkpoint-interval: this job asks for 2 nodes" in sub.stderr, sub.stderr
    job = tc.job_id(sub)
    tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)
    time.sleep(12)  # two intervals and more
    line = "slurm_mm: this job was allocated 2 nodes"
    assert output(job_dir).count(line) == 1, output(job_dir)
    assert image_names(cluster, job) == []
    status = as_user(cluster, "slurm-mm", "status")
    assert "allocated 2 nodes" in status.stdout, status.stdout + status.stderr
    # Two of the three nodes: the rerun may well use the preempted one again.
    info = preempt_to_another_node(cluster, job, job_dir, another_node=False)
    out = output(job_dir)
    assert info["JobState"] == "COMPLETED", out
    results = [l.split()[0] for l in out.splitlines() if l.startswith("result=")]
    assert results == [f"result={chain(steps)}"] * 2, out  # both tasks of the rerun, whole
    assert image_names(cluster, job) == []


def test_sbatch_refuses_multi_node_jobs_when_the_site_says_so(cluster, job_dir):
    lua = cluster.etc / "cli_filter.lua"
    original = lua.read_text()
    lua.write_text(original.replace('local MULTINODE_POLICY = "warn"', 'local MULTINODE_POLICY = "error"'))
    try:
        proc = tc.sbatch(cluster, "#!/bin/sh\ntrue\n", "-N2", "--checkpoint-interval=5s",
                         "-o", "/dev/null", cwd=job_dir, check=False)
        plain = tc.sbatch(cluster, "#!/bin/sh\ntrue\n", "-N2", "-o", "/dev/null", cwd=job_dir, check=False)
    finally:
        lua.write_text(original)
    assert proc.returncode != 0
    assert "this job asks for 2 nodes" in proc.stderr and "refused by this site" in proc.stderr, proc.stderr
    assert plain.returncode == 0, plain.stderr  # jobs without the option are not its business


def _step_running(cluster, job: str) -> bool:
    out = subprocess.run(["squeue", "-s", "-j", job, "-h", "-o", "%i"], env=cluster.env(),
                         capture_output=True, text=True).stdout
    return f"{job}.0" in out.split()


def _batch_tree_init(job: str) -> int:
    """Host PID of the job's namespace init (mm-init, PID 1 of its namespace)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cgroup = Path(f"/proc/{entry}/cgroup").read_text()
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        nspid = [l.split()[1:] for l in status.splitlines() if l.startswith("NSpid:")]
        if comm == "mm-init" and f"/job_{job}/step_batch" in cgroup and nspid and nspid[0][-1] == "1":
            return int(entry)
    raise AssertionError(f"no mm-init tree for job {job}")


def test_restored_tree_whose_step_is_gone_fails_with_the_reason(cluster, job_dir):
    # Without the check, the restored srun client finds its step gone and exits 0.
    script = "#!/bin/bash\n/usr/bin/srun -n1 sleep 300 || exit $?\necho the-step-finished\n"
    # Pinned to one node: the image below is taken by `slurm-mm checkpoint --pid`, which does
    # not record the job's node-local files (its batch script), so only its own node can
    # restore it; what is tested here is what the restored tree's srun means.
    job = tc.job_id(submit(cluster, job_dir, script, "--checkpoint-interval=10m", "-w", "n1", name="lost"))
    tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)
    tc.wait_for(lambda: _step_running(cluster, job), 30, "step 0 running")
    # An image that holds the srun client, as slurm_mm before the step check wrote them:
    # taken below the agent, straight into the job's image directory.
    env = {**os.environ, "SLURM_MM_CONFIG": str(cluster.mm_config)}
    dump = subprocess.run(["/opt/slurm_mm/venv/bin/slurm-mm", "checkpoint", "--pid", str(_batch_tree_init(job)),
                           "--to", str(cluster.checkpoint_root / job), "--leave-running"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert dump.returncode == 0, dump.stdout + dump.stderr
    assert len(image_names(cluster, job)) == 1
    subprocess.run(["scontrol", "requeue", job], env=cluster.env(), check=True)
    info = tc.wait_job(cluster, job, {"COMPLETED", "FAILED"}, timeout=120)
    out = output(job_dir, "lost")
    assert info["JobState"] == "FAILED", out
    assert info["Restarts"] == "1"
    assert "error: the restored image held srun step `/usr/bin/srun -n1 sleep 300`" in out, out
    assert "the-step-finished" not in out
