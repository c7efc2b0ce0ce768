"""A job's files travel with its image: ordinary `#!/bin/bash` batch scripts on the real
cluster, resumed on a different node after preemption, a drain and a node kill.

The job is tests/workloads/pipeline_app.py run as a child of bash (bash keeps its script,
a node-local file in slurmd's per-node spool dir, open) or exec'd: it maps a shared
input, keeps scratch in a per-node $TMPDIR, writes its log with open(..., "w"), writes,
reads back and deletes intermediates, and refuses to start over its own output. Its
outputs must equal an uninterrupted run's, with exactly one fresh start.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import testcluster as tc
from slurm_jobs import as_user, image_names, preempt_to_another_node

pytestmark = pytest.mark.cluster

APP = Path(__file__).parent / "workloads" / "pipeline_app.py"


def scontrol(cluster, *args: str, check: bool = True) -> None:
    subprocess.run(["scontrol", *args], env=cluster.env(), check=check, capture_output=True)


def resume_node(cluster, node: str) -> None:
    scontrol(cluster, "update", f"NodeName={node}", "State=RESUME", check=False)
    tc.wait_for(lambda: tc.node_states(cluster).get(node) in ("idle", "mix", "alloc"), 60, f"{node} back")


def node_tmp(cluster) -> Path:
    """Each node's own /tmp stand-in: the test wipes a node's when the job leaves it."""
    return cluster.state / "nodetmp"


class PipelineJob:
    def __init__(self, cluster, job_dir: Path, stages: int, delay: float, *, exec_app: bool = False,
                 launcher: str = "", interval: str = "10m", options: tuple[str, ...] = ()) -> None:
        self.cluster, self.dir, self.stages, self.exec_app = cluster, job_dir, stages, exec_app
        user = pwd.getpwnam(tc.USER)
        shutil.copy(APP, job_dir / "app.py")
        (job_dir / "input.dat").write_bytes(os.urandom(300_000))
        for p in (job_dir / "app.py", job_dir / "input.dat"):
            os.chown(p, user.pw_uid, user.pw_gid)
        base = node_tmp(cluster)
        base.mkdir(mode=0o1777, exist_ok=True)
        base.chmod(0o1777)
        run = "exec " if exec_app else ""
        script = ("#!/bin/bash\n"
                  f"export TMPDIR={base}/$SLURMD_NODENAME/job$SLURM_JOB_ID\n"
                  "mkdir -p \"$TMPDIR\"\n"
                  "echo \"run on $SLURMD_NODENAME\"\n"
                  f"{run}{launcher}/usr/bin/python3 {job_dir}/app.py {job_dir}/out {job_dir}/input.dat {stages} {delay}\n"
                  "rc=$?\n"
                  "echo \"app exited $rc\"\n"
                  "exit $rc\n")
        opts = ["-o", str(job_dir / "job.out"), "--open-mode=append", f"--checkpoint-interval={interval}",
                *options]
        self.id = tc.job_id(tc.sbatch(cluster, script, *opts, cwd=job_dir))

    def output(self) -> str:
        path = self.dir / "job.out"
        return path.read_text() if path.exists() else ""

    def stages_done(self) -> int:
        log = self.dir / "out" / "log.txt"
        return len(log.read_text().splitlines()) if log.exists() else 0

    def wipe_node_tmp(self, node: str) -> None:
        shutil.rmtree(node_tmp(self.cluster) / node, ignore_errors=True)

    def assert_same_as_uninterrupted(self, tmp_path: Path) -> None:
        ref = tmp_path / "reference"
        env = dict(os.environ, TMPDIR=str(tmp_path))
        subprocess.run(["/usr/bin/python3", str(APP), str(ref), str(self.dir / "input.dat"), str(self.stages), "0"],
                       check=True, env=env, capture_output=True)
        out = self.dir / "out"
        assert (out / "log.txt").read_text() == (ref / "log.txt").read_text()
        assert (out / "result.txt").read_text() == (ref / "result.txt").read_text()
        assert sorted(os.listdir(out / "tmp")) == []
        starts = (self.dir / "out.starts").read_text().splitlines()
        assert len(starts) == 1, f"fresh starts: {starts}; job output:\n{self.output()}"
        # bash itself read its script again after the app (unless it exec'd the app)
        assert ("app exited 0" in self.output()) != self.exec_app


def test_preempted_bash_job_resumes_on_another_node_with_its_files(cluster, job_dir, tmp_path):
    job = PipelineJob(cluster, job_dir, stages=40, delay=0.5, options=("-p", "low"))
    # The node-local files are wiped once the job left: what the next node never had.
    info = preempt_to_another_node(cluster, job.id, job_dir, ready=lambda: job.stages_done() >= 5,
                                   on_requeue=job.wipe_node_tmp, hold=40)
    assert info["JobState"] == "COMPLETED", job.output()
    assert "for preempt" in job.output() and "restored from ckpt-" in job.output()
    assert "slurm_script: handed over from the image" in job.output()
    job.assert_same_as_uninterrupted(tmp_path)


def test_preempted_srun_step_resumes_on_another_node_with_its_files(cluster, job_dir, tmp_path):
    # The application runs as an srun step (its own task tree, dumped beside the batch
    # tree's): its node-local scratch must come back on the next node with it.
    job = PipelineJob(cluster, job_dir, stages=40, delay=0.5, launcher="srun -n1 ", options=("-p", "low"))
    info = preempt_to_another_node(cluster, job.id, job_dir, ready=lambda: job.stages_done() >= 5,
                                   on_requeue=job.wipe_node_tmp, hold=40)
    out = job.output()
    assert info["JobState"] == "COMPLETED", out
    assert "for preempt" in out and "restored task 0 of step" in out, out
    assert "scratch-" in out and "node-local file recreated (task 0)" in out, out
    job.assert_same_as_uninterrupted(tmp_path)


def test_drained_exec_job_resumes_on_another_node_with_its_files(cluster, job_dir, tmp_path):
    scontrol(cluster, "update", "NodeName=n2,n3", "State=DRAIN", "Reason=test-parking")
    try:
        job = PipelineJob(cluster, job_dir, stages=40, delay=0.5, exec_app=True)
        assert tc.wait_job(cluster, job.id, {"RUNNING"}, timeout=30)["BatchHost"] == "n1"
    finally:
        resume_node(cluster, "n2")
        resume_node(cluster, "n3")
    tc.wait_for(lambda: job.stages_done() >= 5, 60, "5 stages")
    try:
        res = subprocess.run(["slurm-mm", "drain", "n1", "--reason", "disk swap", "--timeout", "60"],
                             env=cluster.env(), capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        job.wipe_node_tmp("n1")
        info = tc.wait_job(cluster, job.id, {"COMPLETED", "FAILED"}, timeout=150)
    finally:
        resume_node(cluster, "n1")
    assert info["JobState"] == "COMPLETED" and info["BatchHost"] != "n1", job.output()
    assert "for drain" in job.output() and "restored from ckpt-" in job.output()
    job.assert_same_as_uninterrupted(tmp_path)


def test_killed_node_bash_job_resumes_from_periodic_image_with_files_rolled_back(cluster, job_dir, tmp_path):
    job = PipelineJob(cluster, job_dir, stages=70, delay=0.5, interval="15s")
    node = tc.wait_job(cluster, job.id, {"RUNNING"}, timeout=30)["BatchHost"]
    tc.wait_for(lambda: len(image_names(cluster, job.id)) >= 1, 60, "a periodic image")
    at_image = job.stages_done()
    tc.wait_for(lambda: job.stages_done() >= at_image + 4, 30, "progress past the image")
    tc.kill_node(cluster, node)
    job.wipe_node_tmp(node)
    try:
        tc.wait_job(cluster, job.id, {"RUNNING"}, timeout=120, node_not=node)
        info = tc.wait_job(cluster, job.id, {"COMPLETED", "FAILED"}, timeout=150)
    finally:
        tc.start_node(cluster, node)
        resume_node(cluster, node)
    assert info["JobState"] == "COMPLETED", job.output()
    out = job.output()
    assert "restored from ckpt-" in out
    assert "log.txt: cut back from" in out  # the log had grown past the image
    job.assert_same_as_uninterrupted(tmp_path)


def test_image_refused_when_another_party_changed_an_input_the_job_holds(cluster, job_dir):
    job = PipelineJob(cluster, job_dir, stages=200, delay=0.5,
                      options=("--export=ALL,SLURM_MM_RESTORE_POLICY=fail",))
    tc.wait_job(cluster, job.id, {"RUNNING"}, timeout=30)
    tc.wait_for(lambda: job.stages_done() >= 3, 60, "progress")
    res = as_user(cluster, "slurm-mm", "checkpoint", job.id, "--requeue")
    assert res.returncode == 0, res.stderr
    with open(job_dir / "input.dat", "ab") as f:  # someone else's edit, between image and restore
        f.write(b"edited")
    info = tc.wait_job(cluster, job.id, {"FAILED", "COMPLETED"}, timeout=120)
    out = job.output()
    assert info["JobState"] == "FAILED", out
    assert f"{job_dir}/input.dat: size 300000 -> 300006" in out
    assert "restore policy 'fail'" in out
    assert len((job_dir / "out.starts").read_text().splitlines()) == 1  # never rerun over its output


def test_node_local_files_past_the_budget_resume_on_their_own_node(cluster, job_dir, tmp_path):
    tc.set_agent_config(cluster, "file_state_budget", "100")  # smaller than the batch script
    scontrol(cluster, "update", "NodeName=n2,n3", "State=DRAIN", "Reason=test-parking")
    try:
        job = PipelineJob(cluster, job_dir, stages=40, delay=0.5)
        assert tc.wait_job(cluster, job.id, {"RUNNING"}, timeout=30)["BatchHost"] == "n1"
        tc.wait_for(lambda: job.stages_done() >= 4, 60, "progress")
        res = as_user(cluster, "slurm-mm", "checkpoint", job.id, "--requeue")
        assert res.returncode == 0, res.stderr
        tc.wait_for(lambda: tc.job_info(cluster, job.id).get("Restarts") == "1", 60, "requeue")
        info = tc.wait_job(cluster, job.id, {"COMPLETED", "FAILED"}, timeout=150)
    finally:
        resume_node(cluster, "n2")
        resume_node(cluster, "n3")
        tc.set_agent_config(cluster, "file_state_budget", str(1 << 30))
    out = job.output()
    assert "past the image's file budget of 100 bytes: the image can resume the job on n1 only" in out
    assert info["JobState"] == "COMPLETED" and "restored from ckpt-" in out, out
    job.assert_same_as_uninterrupted(tmp_path)
