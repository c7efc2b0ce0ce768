"""Finding: the job's environment reached root. An enrolled job's environment must reach
its application and nothing that runs with root credentials (mm-init, criu, the
agent's children), whatever the variables are called."""

from __future__ import annotations

import os
import pwd
import subprocess

import pytest

from conftest import testcluster as tc
from slurm_jobs import as_user, assert_correct_result, logged_steps, output

pytestmark = pytest.mark.cluster

# A loader preload whose constructor records the effective uid of every process that
# loads it: the hostile user's way to run code in whatever starts with the job's env.
PROBE_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
__attribute__((constructor)) static void record(void)
{
	char line[512], exe[256] = "?";
	ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
	int fd = open(RECORD, O_WRONLY | O_APPEND | O_CREAT, 0666);
	if (n > 0) exe[n] = '\0';
	if (fd < 0) return;
	n = snprintf(line, sizeof(line), "euid=%d exe=%s\n", (int)geteuid(), exe);
	write(fd, line, (size_t)n);
	close(fd);
}
"""


def _user_file(path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    path.chmod(mode)
    user = pwd.getpwnam(tc.USER)
    os.chown(path, user.pw_uid, user.pw_gid)


def test_job_environment_reaches_the_app_and_no_root_process(cluster, job_dir):
    user = pwd.getpwnam(tc.USER)
    record = job_dir / "euid.log"
    _user_file(record, "", 0o666)
    (job_dir / "probe.c").write_text(PROBE_C)
    subprocess.run(["gcc", "-shared", "-fPIC", f'-DRECORD="{record}"', "-o", str(job_dir / "probe.so"),
                    str(job_dir / "probe.c")], check=True)
    os.chown(job_dir / "probe.so", user.pw_uid, user.pw_gid)
    # Tools and config a root helper might look up by the job's PATH / variables.
    evil = job_dir / "evil"
    evil.mkdir()
    os.chown(evil, user.pw_uid, user.pw_gid)
    marker = job_dir / "evil-ran"
    for tool in ("criu", "scontrol", "squeue", "python3", "mm-init", "sh"):
        _user_file(evil / tool, f"#!/bin/sh\ntouch {marker}\nexit 1\n", 0o755)
    _user_file(job_dir / "evil.yaml", "criu_path: /tmp/nonexistent\n")
    (job_dir / "chain_job.py").write_text((tc.REPO / "tests" / "workloads" / "chain_job.py").read_text())
    script = ("#!/bin/sh\n"
              'echo "app-env: probe=$SLURM_MM_PROBE preload=$LD_PRELOAD"\n'
              f"exec /usr/bin/python3 {job_dir}/chain_job.py 60 0.25 {job_dir}/chain.log\n")
    env = ",".join([
        "ALL", f"LD_PRELOAD={job_dir}/probe.so", f"LD_LIBRARY_PATH={evil}", f"PATH={evil}:/usr/bin:/bin",
        f"GCONV_PATH={evil}", f"PYTHONPATH={evil}", f"PYTHONSTARTUP={evil}/sh", f"LOCPATH={evil}",
        f"SLURM_MM_CONFIG={job_dir}/evil.yaml", "SLURM_MM_PROBE=kept-for-the-app"])
    job = tc.job_id(tc.sbatch(cluster, script, f"--export={env}", "--checkpoint-interval=10m",
                              "-o", str(job_dir / "chain.out"), cwd=job_dir))
    try:
        tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)
        tc.wait_for(lambda: len(logged_steps(job_dir)) >= 4, 30, "progress")
        res = as_user(cluster, "slurm-mm", "checkpoint", job, "--requeue")
        assert res.returncode == 0, res.stderr
        info = tc.wait_job(cluster, job, {"COMPLETED", "FAILED"}, timeout=120)
    finally:
        subprocess.run(["scancel", job], env=cluster.env())
    text = output(job_dir)
    assert info["JobState"] == "COMPLETED" and "restored from" in text, text
    assert_correct_result(job_dir, 60)
    # The application got the job's environment, loader variables included ...
    assert f"app-env: probe=kept-for-the-app preload={job_dir}/probe.so" in text, text
    records = record.read_text().splitlines()
    assert any(r.startswith(f"euid={user.pw_uid} ") for r in records), records
    # ... and not one process with root credentials loaded it, nor ran the user's tools.
    assert not [r for r in records if r.startswith("euid=0 ")], records
    assert not marker.exists()
