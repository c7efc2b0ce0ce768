"""GPU jobs under real Slurm (slurm_gpu_scenario.py) as a pytest test, and its cluster's config.

The scenario needs a GPU, Slurm and slurm_mm's install on one machine: it is skipped
elsewhere. On the GPU machine run it through `tests/gpu/run_under_slurm.sh` (which installs
the bundle first), or, where Slurm is installed, `python3 -m pytest --noconftest
tests/gpu/test_gpu_slurm.py`. The config test only writes files and runs anywhere Slurm is.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slurm_gpu_cluster as gc  # noqa: E402

needs_slurm = pytest.mark.skipif(shutil.which("slurmd") is None, reason="Slurm is not installed here")


@needs_slurm
def test_gpu_cluster_config_has_gres_cgroup_v2_and_grace(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_MM_TEST_MOUNT_NS", raising=False)
    c = gc.tc.Cluster(tmp_path / "cluster")
    gc.write_configs(c, "requeue", gpu=True, grace=77, cpus=6)
    conf = c.slurm_conf.read_text()
    assert "GresTypes=gpu" in conf
    nodes = [line for line in conf.splitlines() if line.startswith("NodeName=")]
    assert len(nodes) == len(gc.tc.NODES) and all("CPUs=6" in n and "Gres=gpu:1" in n for n in nodes)
    assert "GraceTime=77" in conf and "GraceTime=20" not in conf
    assert (c.etc / "gres.conf").read_text().strip() == "NodeName=n1,n2,n3 Name=gpu File=/dev/nvidia0"
    assert "IgnoreSystemd=yes" in (c.etc / "cgroup.conf").read_text()
    assert "job_mount_namespace: auto" in c.mm_config.read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not gc.has_gpu() or shutil.which("slurmd") is None
                    or not Path("/opt/slurm_mm/venv/bin/slurm-mm-run").exists(),
                    reason="needs an NVIDIA GPU, Slurm and slurm_mm's install on this machine")
def test_gpu_jobs_survive_preemption_suspend_and_scancel_under_slurm(tmp_path):
    import slurm_gpu_scenario  # noqa: PLC0415

    python = "/opt/torch/.venv/bin/python3" if Path("/opt/torch/.venv/bin/python3").exists() else sys.executable
    rc = slurm_gpu_scenario.main(["--out", str(tmp_path), "--python", python])
    report = json.loads((tmp_path / "report.json").read_text())
    failed = [c for c in report["checks"] if c["verdict"] == "FAIL"]
    assert rc == 0 and not failed, failed
