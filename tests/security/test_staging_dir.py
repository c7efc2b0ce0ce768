"""Finding: the staging directory was trusted as configured (default under world-writable
/var/tmp): a user who made it first got root CRIU to dump into and restore from a
directory they control. The agent now refuses to start unless it and every directory
above it are root's alone, and makes it 0700."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import testcluster as tc

pytestmark = pytest.mark.cluster


def _start_agent(cluster, staging: Path, tmp_path: Path) -> subprocess.CompletedProcess | None:
    """A real node agent with `staging` as its staging_dir; None if it kept running (served)."""
    cfg = tmp_path / "slurm_mm.yaml"
    lines = [l for l in cluster.mm_config.read_text().splitlines() if not l.startswith("staging_dir:")]
    cfg.write_text("\n".join(lines + [f"staging_dir: {staging}"]) + "\n")
    env = cluster.env()
    env["SLURM_MM_CONFIG"] = str(cfg)
    try:
        return subprocess.run([str(tc.PYTHON), "-m", "slurm_mm.agent", "--node", "n1",
                               "--socket", str(tmp_path / "agent.sock")],
                              env=env, capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return None


@pytest.fixture()
def world_writable(tmp_path):
    """A fresh directory under /tmp (sticky, world-writable) for the user to play in."""
    base = Path("/tmp") / f"slurm_mm-sec-{os.getpid()}"
    subprocess.run(["rm", "-rf", str(base)], check=True)
    yield base
    subprocess.run(["rm", "-rf", str(base), f"{base}-link"], check=True)


def test_agent_refuses_a_staging_dir_a_user_made_first(cluster, tmp_path, world_writable):
    staging = world_writable
    subprocess.run(["runuser", "-u", tc.USER, "--", "mkdir", "-m", "0777", str(staging)], check=True)
    res = _start_agent(cluster, staging, tmp_path)
    assert res is not None, "the agent served with a staging directory a user owns"
    assert res.returncode != 0 and f"staging_dir {staging}" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and "not root" in res.stderr


def test_agent_refuses_a_staging_dir_reached_through_a_users_symlink(cluster, tmp_path, world_writable):
    target = world_writable
    link = Path(f"{target}-link")
    subprocess.run(["runuser", "-u", tc.USER, "--", "mkdir", str(target)], check=True)
    subprocess.run(["runuser", "-u", tc.USER, "--", "ln", "-s", str(target), str(link)], check=True)
    res = _start_agent(cluster, link / "staging", tmp_path)
    assert res is not None, "the agent served with a staging directory behind a user's symlink"
    assert res.returncode != 0 and f"{link} is a symlink" in res.stderr, res.stderr
    assert not (target / "staging").exists()


def test_running_agents_keep_their_staging_root_only(cluster):
    st = os.lstat(cluster.state / "staging")
    assert st.st_uid == 0 and st.st_mode & 0o777 == 0o700
