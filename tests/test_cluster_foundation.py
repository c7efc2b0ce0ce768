"""The test cluster and the SPANK option, on real Slurm daemons."""

from __future__ import annotations

import subprocess

import pytest

from conftest import testcluster as tc

pytestmark = pytest.mark.cluster


def test_cluster_starts_with_three_idle_nodes(cluster):
    assert tc.node_states(cluster) == {"n1": "idle", "n2": "idle", "n3": "idle"}
    daemons = {name: pid for name, pid in tc.status(cluster).items() if not name.startswith("agent")}
    assert {"slurmctld", "munged", "slurmd-n1", "slurmd-n2", "slurmd-n3"} <= set(daemons) and all(daemons.values()), daemons


def test_sbatch_help_lists_checkpoint_interval(cluster):
    out = subprocess.run(["sbatch", "--help"], env=cluster.env(), capture_output=True, text=True)
    assert "--checkpoint-interval=time" in out.stdout


def test_enrolled_job_sees_interval_on_node(cluster, job_dir):
    out = job_dir / "interval.out"
    proc = tc.sbatch(cluster, "#!/bin/sh\necho \"interval=$SLURM_MM_CHECKPOINT_INTERVAL node=$SLURMD_NODENAME\"\n",
                     "--checkpoint-interval=30m", "-o", str(out), cwd=job_dir)
    job = tc.job_id(proc)
    info = tc.wait_job(cluster, job, {"COMPLETED", "FAILED"}, timeout=60)
    assert info["JobState"] == "COMPLETED", info
    text = out.read_text()
    assert "interval=1800" in text
    assert f"node={info['BatchHost']}" in text


@pytest.mark.parametrize("value,seconds", [("30", 1800), ("30:00", 1800), ("1:00:00", 3600),
                                           ("1-0", 86400), ("2h", 7200)])
def test_slurm_time_formats_reach_the_node(cluster, job_dir, value, seconds):
    out = job_dir / "f.out"
    proc = tc.sbatch(cluster, "#!/bin/sh\necho $SLURM_MM_CHECKPOINT_INTERVAL\n",
                     f"--checkpoint-interval={value}", "-o", str(out), cwd=job_dir)
    info = tc.wait_job(cluster, tc.job_id(proc), {"COMPLETED", "FAILED"}, timeout=60)
    assert info["JobState"] == "COMPLETED"
    assert out.read_text().strip().splitlines()[-1] == str(seconds)


def _queued_jobs(cluster) -> str:
    return subprocess.run(["squeue", "-h", "-o", "%i"], env=cluster.env(),
                          capture_output=True, text=True).stdout


@pytest.mark.parametrize("bad", ["bogus", "10x", "1:99", "-5", "1-25", ""])
def test_bad_interval_is_refused_by_sbatch(cluster, job_dir, bad):
    before = _queued_jobs(cluster)
    proc = tc.sbatch(cluster, "#!/bin/sh\ntrue\n", f"--checkpoint-interval={bad}",
                     cwd=job_dir, check=False)
    assert proc.returncode != 0
    assert f"invalid value '{bad}'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip() == ""
    assert _queued_jobs(cluster) == before


def test_interval_below_site_minimum_is_refused(cluster, job_dir):
    proc = tc.sbatch(cluster, "#!/bin/sh\ntrue\n", "--checkpoint-interval=2s", cwd=job_dir, check=False)
    assert proc.returncode != 0
    assert "shorter than this site's minimum of 5 seconds" in proc.stderr


def test_job_without_option_has_no_interval(cluster, job_dir):
    out = job_dir / "plain.out"
    proc = tc.sbatch(cluster, "#!/bin/sh\necho \"[${SLURM_MM_CHECKPOINT_INTERVAL:-unset}]\"\n",
                     "-o", str(out), cwd=job_dir)
    info = tc.wait_job(cluster, tc.job_id(proc), {"COMPLETED", "FAILED"}, timeout=60)
    assert info["JobState"] == "COMPLETED"
    assert out.read_text().strip() == "[unset]"
