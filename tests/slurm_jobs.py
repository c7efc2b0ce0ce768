"""Helpers for integration tests that run the self-checking chain job on the cluster."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path
from typing import Callable

from conftest import testcluster as tc
from workloads.chain_job import chain

WORKLOAD = Path(__file__).parent / "workloads" / "chain_job.py"


def submit_chain(cluster, job_dir: Path, steps: int, delay: float, *options: str,
                 interval: str | None = "5s", exit_code: int = 0, name: str = "chain") -> str:
    """Submit the chain job as the test user; its files live in job_dir/<name>.*"""
    shutil.copy(WORKLOAD, job_dir / "chain_job.py")
    user = pwd.getpwnam(tc.USER)
    os.chown(job_dir / "chain_job.py", user.pw_uid, user.pw_gid)
    # The shape most batch scripts have: bash runs the app as a child and keeps its own
    # script (a node-local file in slurmd's spool dir) open to read what follows.
    script = (f"#!/bin/bash\n/usr/bin/python3 {job_dir}/chain_job.py {steps} {delay} "
              f"{job_dir}/{name}.log {exit_code}\nexit $?\n")
    opts = list(options) + ["-o", str(job_dir / f"{name}.out"), "-J", name]
    if interval:
        opts.append(f"--checkpoint-interval={interval}")
    return tc.job_id(tc.sbatch(cluster, script, *opts, cwd=job_dir))


def logged_steps(job_dir: Path, name: str = "chain") -> list[int]:
    path = job_dir / f"{name}.log"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def output(job_dir: Path, name: str = "chain") -> str:
    path = job_dir / f"{name}.out"
    return path.read_text() if path.exists() else ""


def assert_correct_result(job_dir: Path, steps: int, name: str = "chain") -> None:
    """The job's own verdict: its in-memory hash chain equals an uninterrupted run's."""
    lines = [l for l in output(job_dir, name).splitlines() if l.startswith("result=")]
    assert len(lines) == 1, output(job_dir, name)
    assert lines[0].split()[0] == f"result={chain(steps)}"
    assert f"steps={steps}" in lines[0]


def assert_no_lost_or_repeated_steps(job_dir: Path, steps: int, name: str = "chain") -> None:
    assert logged_steps(job_dir, name) == list(range(1, steps + 1))


def preempt_to_another_node(cluster, job: str, job_dir: Path, *, ready: Callable[[], bool] | None = None,
                            on_requeue: Callable[[str], None] | None = None, another_node: bool = True,
                            hold: int = 45) -> dict[str, str]:
    """Preempt `job` (partition low) once `ready()`: an exclusive high-priority job takes its
    node for `hold` seconds. Waits for Slurm's requeue (Restarts 1), calls `on_requeue(node)`,
    waits for the job's end and returns its final record, which must show one restart and,
    with `another_node`, a batch host other than the preempted one."""
    node = tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)["BatchHost"]
    if ready is not None:
        tc.wait_for(ready, 60, "the job to be under way")
    urgent = tc.job_id(tc.sbatch(cluster, f"#!/bin/sh\nsleep {hold}\n", "-p", "high", "-w", node,
                                 "--exclusive", "-o", "/dev/null", cwd=job_dir))
    try:
        tc.wait_for(lambda: tc.job_info(cluster, job).get("Restarts") == "1", 60, "the requeue")
        if on_requeue is not None:
            on_requeue(node)
        info = tc.wait_job(cluster, job, {"COMPLETED", "FAILED"}, timeout=150)
    finally:
        subprocess.run(["scancel", urgent], env=cluster.env())
    assert info["Restarts"] == "1", info
    if another_node:
        assert info["BatchHost"] != node, info
    return info


def image_names(cluster, job: str) -> list[str]:
    path = cluster.checkpoint_root / job
    return sorted(p.name for p in path.glob("ckpt-*")) if path.is_dir() else []


def as_user(cluster, *argv: str, user: str = tc.USER) -> subprocess.CompletedProcess:
    env = {"PATH": "/opt/slurm_mm/venv/bin:/usr/bin:/bin", "SLURM_CONF": str(cluster.slurm_conf),
           "SLURM_MM_CONFIG": str(cluster.mm_config), "HOME": pwd.getpwnam(user).pw_dir}
    return subprocess.run(["runuser", "-u", user, "--", "env", "-i",
                           *(f"{k}={v}" for k, v in env.items()), *argv],
                          capture_output=True, text=True, timeout=300, cwd="/")


def user_processes(pattern: str) -> list[str]:
    out = subprocess.run(["pgrep", "-a", "-u", tc.USER, "-f", pattern], capture_output=True, text=True)
    return out.stdout.splitlines()
