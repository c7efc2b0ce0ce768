"""The cluster configured from contrib/slurm/ as shipped (site values only) protects jobs.

The test cluster loads the installed plugin with the installed plugstack.conf line (no
agent_socket=, no run_wrapper=: the built-in defaults), the snippet's Prolog/Epilog and
cli_filter.lua. An enrolled job submitted by an ordinary user must be checkpointed:
an empty default agent_socket once left every such job silently unprotected.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import REPO
from conftest import testcluster as tc
from slurm_jobs import assert_correct_result, image_names, submit_chain

from slurm_mm import defaults


def _active(text: str) -> list[str]:
    return [l.split("#", 1)[0].strip() for l in text.splitlines() if l.split("#", 1)[0].strip()]


def test_cluster_from_shipped_files_checkpoints_an_enrolled_job(cluster, job_dir):
    shipped = (tc.SHIPPED / "plugstack.conf").read_text()
    assert shipped == (REPO / "contrib" / "slurm" / "plugstack.conf").read_text()
    active = _active((cluster.etc / "plugstack.conf").read_text())
    assert active == [l.replace("min_interval=5m", "min_interval=5s") for l in _active(shipped)]
    assert active[0].split()[1] == defaults.SPANK_PLUGIN and "agent_socket" not in active[0]
    for name in ("slurm.conf", "plugstack.conf", "prolog", "epilog"):
        assert str(REPO) not in (cluster.etc / name).read_text(), f"{name} loads from the checkout"

    job = submit_chain(cluster, job_dir, 40, 0.25, interval="5s")
    tc.wait_for(lambda: image_names(cluster, job), 60, "a periodic image of the enrolled job")
    info = tc.wait_job(cluster, job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=120)
    assert info["JobState"] == "COMPLETED"
    assert_correct_result(job_dir, 40)


def test_config_check_sees_agent_and_plugin_agree(cluster):
    proc = subprocess.run(["slurm-mm", "config", "check", "--show"], env=cluster.env(),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    plugin = proc.stdout.split("# SPANK plugin")[1]
    assert f"agent_socket: {defaults.AGENT_SOCKET}" in plugin and "min_interval: 5" in plugin


def test_slurm_mm_is_on_a_login_shells_path():
    tc.ensure_user()
    proc = subprocess.run(["runuser", "-l", tc.USER, "-c", "slurm-mm --help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "checkpoint" in proc.stdout, proc.stderr


def test_agent_publishes_metrics_and_admin_comment(cluster, job_dir):
    job = submit_chain(cluster, job_dir, 40, 0.25, interval="5s", name="observed")
    info = tc.wait_job(cluster, job, {"RUNNING"}, timeout=60)
    tc.wait_for(lambda: "last_image=ckpt-" in tc.admin_comment(cluster, job), 60, "AdminComment with the image")
    assert "trigger=periodic" in tc.admin_comment(cluster, job)
    prom = cluster.metrics / f"slurm_mm_{info['BatchHost']}.prom"
    text = prom.read_text()
    assert f'slurm_mm_checkpoints_total{{node="{info["BatchHost"]}",outcome="success",trigger="periodic"}}' in text
    assert 'slurm_mm_jobs_started_total{mode="launched"' in text
    agent_log = (cluster.log / f"agent-{info['BatchHost']}.log").read_text()
    assert f"event=checkpoint job={job} trigger=periodic outcome=success" in agent_log
    tc.wait_job(cluster, job, {"COMPLETED", "FAILED"}, timeout=120)


def test_agents_run_the_installed_package_not_the_checkout(cluster):
    for node in tc.NODES:
        pid = tc.read_pid(cluster.pid_file(f"agent-{node}"))
        assert pid is not None
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"-I" in argv and os.readlink(f"/proc/{pid}/cwd") == "/"
    where = subprocess.run([str(tc.PYTHON), "-I", "-c", "import slurm_mm; print(slurm_mm.__file__)"],
                           cwd="/", capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(tc.PREFIX)) and not where.startswith(str(REPO))
