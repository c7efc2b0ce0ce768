"""Real scientific applications (GROMACS, velvet, bwa + samtools: Debian packages, not
ours) as ordinary `#!/bin/bash` batch scripts, interrupted on the real cluster and
resumed on another node. Each result must equal an uninterrupted run's byte for byte,
with one fresh start. The apps are in tests/workloads/real_apps.py.

To stay lean, scenarios are combined: the GROMACS job is preempted and, once resumed
on another node, drained off that one (two restores, one run); the velvet job (its two
stages through `srun`) is preempted; the bwa | samtools job loses its node after a
periodic image and resumes from it.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest

from conftest import testcluster as tc
from slurm_jobs import image_names
from workloads import real_apps

pytestmark = pytest.mark.cluster


def scontrol(cluster, *args: str) -> None:
    subprocess.run(["scontrol", *args], env=cluster.env(), capture_output=True)


def resume_node(cluster, node: str) -> None:
    scontrol(cluster, "update", f"NodeName={node}", "State=RESUME")
    tc.wait_for(lambda: tc.node_states(cluster).get(node) in ("idle", "mix", "alloc"), 60, f"{node} back")


def chown_tree(path: Path) -> None:
    user = pwd.getpwnam(tc.USER)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), user.pw_uid, user.pw_gid)


class AppJob:
    """One app's batch script submitted as the test user from its own job directory."""

    def __init__(self, cluster, job_dir: Path, app: str, *, interval: str, options: tuple[str, ...] = ()):
        self.cluster, self.dir, self.app = cluster, job_dir, app
        self.script = real_apps.prepare(app, job_dir)
        chown_tree(job_dir)
        opts = ["-o", str(job_dir / "job.out"), "--open-mode=append", "-J", app,
                f"--checkpoint-interval={interval}", *options]
        self.id = tc.job_id(tc.sbatch(cluster, self.script, *opts, cwd=job_dir))

    def output(self) -> str:
        path = self.dir / "job.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def exists(self, name: str) -> bool:
        return (self.dir / name).exists()

    def wait_running(self, node_not: str | None = None) -> str:
        return tc.wait_job(self.cluster, self.id, {"RUNNING"}, timeout=150, node_not=node_not)["BatchHost"]

    def wait_restarts(self, count: int) -> None:
        tc.wait_for(lambda: tc.job_info(self.cluster, self.id).get("Restarts") == str(count), 90,
                    f"restart {count}")

    def finish(self) -> dict[str, str]:
        info = tc.wait_job(self.cluster, self.id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=240)
        assert info["JobState"] == "COMPLETED", f"{info['JobState']}:\n{self.output()}"
        return info

    def assert_same_as_uninterrupted(self, reference: Reference, *, lost_work: bool = False) -> None:
        """Same result bytes, one fresh start, and the same files left behind. After a
        node loss the lost run's files that did not exist at the image stay (samtools'
        spill files made after it): then the reference's files must all be there."""
        assert f"{self.app.split('-')[0]} done" in self.output()
        assert real_apps.results(self.app, self.dir) == reference.results, self.output()
        starts = real_apps.fresh_starts(self.dir)
        assert len(starts) == 1, f"fresh starts: {starts}\n{self.output()}"
        left = real_apps.listing(self.dir)
        if lost_work:
            assert set(reference.listing) <= set(left), left
        else:
            assert left == reference.listing


class Reference(NamedTuple):
    results: dict[str, str]
    listing: list[str]


def uninterrupted(app: str, directory: Path) -> Reference:
    """The same script run straight through, outside Slurm (`srun` runs its command)."""
    directory.mkdir()
    script = real_apps.prepare(app, directory)
    shim = directory / "bin"
    shim.mkdir()
    (shim / "srun").write_text('#!/bin/sh\n[ "$1" = -n1 ] && shift\nexec "$@"\n')
    (shim / "srun").chmod(0o755)
    run = subprocess.run(["bash", "-c", script], cwd=directory, capture_output=True, text=True,
                         timeout=300, env={"PATH": f"{shim}:/usr/bin:/bin", "HOME": str(directory)})
    assert run.returncode == 0, run.stdout + run.stderr
    return Reference(real_apps.results(app, directory), real_apps.listing(directory))


def preempt(cluster, job: AppJob, node: str) -> str:
    """A high-priority exclusive job on the node; returns its id (the caller cancels it)."""
    return tc.job_id(tc.sbatch(cluster, "#!/bin/sh\nsleep 60\n", "-p", "high", "-w", node, "--exclusive",
                               "-o", "/dev/null", cwd=job.dir))


def preempt_to_another_node(cluster, job: AppJob, node: str) -> str:
    """Preempt `job` off `node`; returns the node it runs on again."""
    urgent = preempt(cluster, job, node)
    try:
        job.wait_restarts(1)
        return job.wait_running(node_not=node)
    finally:
        subprocess.run(["scancel", urgent], env=cluster.env())


def md_steps_logged(job: AppJob) -> int:
    log = job.dir / "md.log"
    return log.read_text(errors="replace").count("           Step           Time") if log.exists() else 0


def test_gromacs_job_preempted_then_drained_equals_uninterrupted_run(cluster, job_dir, tmp_path):
    reference = uninterrupted("md", tmp_path / "reference")
    job = AppJob(cluster, job_dir, "md", interval="10m", options=("-p", "low"))
    node = job.wait_running()
    tc.wait_for(lambda: md_steps_logged(job) >= 4, 90, "mdrun under way")
    second = preempt_to_another_node(cluster, job, node)
    at_restore = md_steps_logged(job)
    tc.wait_for(lambda: md_steps_logged(job) >= at_restore + 3, 90, "mdrun under way again")
    try:
        res = subprocess.run(["slurm-mm", "drain", second, "--reason", "real apps", "--timeout", "90"],
                             env=cluster.env(), capture_output=True, text=True, timeout=150)
        assert res.returncode == 0, res.stdout + res.stderr
        info = job.finish()
    finally:
        resume_node(cluster, second)
    out = job.output()
    assert info["BatchHost"] != second and info["Restarts"] == "2", out
    assert "for preempt" in out and "for drain" in out and out.count("restored from ckpt-") == 2, out
    job.assert_same_as_uninterrupted(reference)


def test_velvet_job_with_srun_steps_preempted_equals_uninterrupted_run(cluster, job_dir, tmp_path):
    reference = uninterrupted("assembly", tmp_path / "reference")
    job = AppJob(cluster, job_dir, "assembly", interval="10m", options=("-p", "low"))
    node = job.wait_running()
    tc.wait_for(lambda: job.exists("asm/PreGraph"), 90, "velvetg under way")
    preempt_to_another_node(cluster, job, node)
    job.finish()
    out = job.output()
    assert "for preempt" in out and "restored from ckpt-" in out, out
    job.assert_same_as_uninterrupted(reference)


def test_bwa_samtools_job_on_killed_node_resumes_from_periodic_image(cluster, job_dir, tmp_path):
    reference = uninterrupted("align", tmp_path / "reference")
    job = AppJob(cluster, job_dir, "align", interval="8s")
    node = job.wait_running()
    # An image taken while samtools holds temporary files it deletes before the end.
    tc.wait_for(lambda: any((job.dir / "sorttmp").glob("part.*")), 90, "samtools spilling")
    images = len(image_names(cluster, job.id))
    tc.wait_for(lambda: len(image_names(cluster, job.id)) > images, 60, "an image while sorting")
    newest = cluster.checkpoint_root / job.id / image_names(cluster, job.id)[-1] / "manifest.json"
    imaged_at = json.loads(newest.read_text())["created"] - 3  # commit start; the freeze is < 1 s before
    tc.kill_node(cluster, node)
    try:
        job.wait_running(node_not=node)
        info = tc.wait_job(cluster, job.id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=240)
    finally:
        tc.start_node(cluster, node)
        resume_node(cluster, node)
    out = job.output()
    assert "restored from ckpt-" in out
    if "File exists" in out:
        # The documented limit (docs/user-guide.md, docs/real-apps.md): spill files the lost
        # run created on the shared filesystem after the image stay. samtools opens them
        # O_EXCL: 1.16 took another name and its BAM was still equal; 1.21 reports the
        # failed create, exits 0, and reads are missing from its BAM.
        late = [p.name for p in (job.dir / "sorttmp").glob("part.*") if p.stat().st_mtime >= imaged_at]
        assert late, f"samtools met files that are not the lost run's late spill files:\n{out}"
        if info["JobState"] != "COMPLETED" or real_apps.results(job.app, job.dir) != reference.results:
            pytest.xfail(f"documented limit: samtools met the lost run's spill files {late} "
                         f"({info['JobState']}{', other result bytes' if info['JobState'] == 'COMPLETED' else ''})")
    assert info["JobState"] == "COMPLETED", f"{info['JobState']}:\n{out}"
    job.assert_same_as_uninterrupted(reference, lost_work=True)


def lj_steps_logged(job: AppJob) -> int:
    log = job.dir / "log.lammps"
    if not log.exists():
        return 0
    rows = [line.split() for line in log.read_text(errors="replace").splitlines()]
    return max((int(r[0]) for r in rows if len(r) == 6 and r[0].isdigit()), default=0)


def test_lammps_job_preempted_equals_uninterrupted_run(cluster, job_dir, tmp_path):
    # An MPI-linked app run as a plain child: OpenMPI's singleton starts an `orted`
    # helper and TCP listeners, all inside the job's tree.
    reference = uninterrupted("lj", tmp_path / "reference")
    job = AppJob(cluster, job_dir, "lj", interval="10m", options=("-p", "low"))
    node = job.wait_running()
    tc.wait_for(lambda: lj_steps_logged(job) >= 800, 90, "lammps under way")
    preempt_to_another_node(cluster, job, node)
    job.finish()
    out = job.output()
    assert "for preempt" in out and "restored from ckpt-" in out, out
    job.assert_same_as_uninterrupted(reference)
