"""MPI jobs on the real cluster, as a user writes them (a plain `#!/bin/bash` script, OpenMPI,
`--checkpoint-interval`): slurm_mm cannot capture MPI ranks whole (their connections to the
process manager and to each other), so every MPI shape is told once that it is not
checkpointed, gets no image, and preemption falls back to Slurm's requeue: the job reruns from
the start and ends with the result of an uninterrupted run. The workload (mpi_ring.c) is its
own judge: a ring of messages whose result needs every message of every step exactly once."""

from __future__ import annotations

import os
import pwd
import shutil
from pathlib import Path

import pytest

from conftest import testcluster as tc
from slurm_jobs import as_user, image_names, logged_steps, output, preempt_to_another_node
from workloads.mpi_ring import build, ring

pytestmark = pytest.mark.cluster

STEPS, DELAY_MS = 60, 250


def submit(cluster, job_dir: Path, run: str, *options: str) -> str:
    """The ring, built with mpicc for the job's user, run by `run` (the script's MPI line)."""
    build(job_dir / "mpi_ring")
    user = pwd.getpwnam(tc.USER)
    os.chown(job_dir / "mpi_ring", user.pw_uid, user.pw_gid)
    script = f"#!/bin/bash\ncd {job_dir}\n{run} ./mpi_ring {STEPS} {DELAY_MS} {job_dir}/ring.log\n"
    opts = [*options, "-p", "low", "--checkpoint-interval=5s", "-o", str(job_dir / "ring.out"), "-J", "ring"]
    return tc.job_id(tc.sbatch(cluster, script, *opts, cwd=job_dir))


def ring_log(job_dir: Path) -> list[int]:
    return logged_steps(job_dir, "ring")


def assert_refused_then_rerun(cluster, job: str, job_dir: Path, line: str, *, another_node: bool = True) -> str:
    """Told once, no image, `slurm-mm status` says why; preempted, Slurm's requeue reruns the
    job from the start and it ends COMPLETED with the uninterrupted run's result."""
    tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)
    tc.wait_for(lambda: len(ring_log(job_dir)) >= 36, 60, "36 ring steps (several intervals)")
    out = output(job_dir, "ring")
    assert out.count(line) == 1, out
    assert image_names(cluster, job) == []
    status = as_user(cluster, "slurm-mm", "status")
    assert line.removeprefix("slurm_mm: ") in status.stdout, status.stdout + status.stderr
    info = preempt_to_another_node(cluster, job, job_dir, another_node=another_node)
    out = output(job_dir, "ring")
    assert info["JobState"] == "COMPLETED", out
    assert [l for l in out.splitlines() if l.startswith("result=")] == [ring(2, STEPS)], out
    log = ring_log(job_dir)  # one partial run, then one whole run from the start
    first = log[:-STEPS]
    assert log[-STEPS:] == list(range(1, STEPS + 1)) and first == list(range(1, len(first) + 1)), log
    assert 0 < len(first) < STEPS, log
    assert image_names(cluster, job) == []
    return out


def test_mpi_job_across_two_nodes_is_refused_and_slurm_reruns_it(cluster, job_dir):
    # mpirun starts its daemon on the second node through Slurm (`srun orted`). (`srun
    # --mpi=pmix -N2` cannot run on this one-host cluster: Slurm's PMIx plugin puts its
    # socket at the unexpanded `SlurmdSpoolDir/%n`, shared by every node here.)
    # The two "nodes" are one host: ranks talk over loopback, which Open MPI 5's TCP
    # transport leaves out unless told ("Unable to find reachable pairing").
    job = submit(cluster, job_dir, "OMPI_MCA_btl_tcp_if_include=lo mpirun -np 2 --map-by node", "-N2",
                 "--ntasks-per-node=1")
    out = assert_refused_then_rerun(cluster, job, job_dir, "slurm_mm: this job was allocated 2 nodes",
                                    another_node=False)
    rerun = [l.split()[-1] for l in out.splitlines() if l.startswith("rank ")][-2:]
    assert len(set(rerun)) == 2, out  # the rerun's ranks really talked across two nodes


def test_single_node_srun_mpi_step_is_refused_and_slurm_reruns_it(cluster, job_dir):
    job = submit(cluster, job_dir, "srun --mpi=pmix -n2", "-N1", "-n2")
    assert_refused_then_rerun(cluster, job, job_dir, "slurm_mm: not checkpointed: MPI")


def test_single_node_mpirun_is_refused_and_slurm_reruns_it(cluster, job_dir):
    job = submit(cluster, job_dir, "mpirun -np 2", "-N1", "-n2")
    assert_refused_then_rerun(cluster, job, job_dir, "slurm_mm: not checkpointed: MPI")
