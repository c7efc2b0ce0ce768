"""Finding: in the private-/proc mode (GPU nodes' default) mm-init reopened the job's stdio
as root, so an O_PATH fd (search permission is all it takes) on a root-only file came
back as a readable stdin. The reopen is now the job user's own, and O_PATH stays O_PATH
(test_mm_init_privileges.py tests that on mm-init itself). On the cluster the attack, a
batch script that runs the wrapper by hand with an O_PATH stdin, no longer even reaches
mm-init: the agent serves only the batch task of an enrolled job, once."""

from __future__ import annotations

import os
import pwd
import subprocess

import pytest

from conftest import testcluster as tc
from slurm_jobs import output

pytestmark = pytest.mark.cluster
ROOT_ONLY = "/etc/shadow"  # 0640 root:shadow in a directory everyone may search


@pytest.fixture()
def private_proc_agents(cluster):
    tc.set_agent_config(cluster, "job_mount_namespace", "always")
    yield
    tc.set_agent_config(cluster, "job_mount_namespace", "never")


def test_an_o_path_stdin_on_a_root_only_file_is_not_reopened_readable(cluster, job_dir, private_proc_agents):
    user = pwd.getpwnam(tc.USER)
    assert not os.access(ROOT_ONLY, os.R_OK, effective_ids=False) or os.getuid() == 0
    reader = job_dir / "reader.sh"
    reader.write_text("#!/bin/sh\necho reader-ran\nhead -c 300\necho\necho reader-done\n")
    attack = job_dir / "attack.py"
    # The batch script itself asks the agent to start a command with an O_PATH stdin.
    attack.write_text(
        "import os\n"
        f"fd = os.open({ROOT_ONLY!r}, os.O_PATH)\n"
        "os.dup2(fd, 0)\n"
        f"os.environ['SLURM_MM_SCRIPT'] = {str(reader)!r}\n"
        f"os.environ['SLURM_MM_AGENT_SOCKET'] = '{cluster.run}/agent-%n.sock'\n"
        "os.execv('/opt/slurm_mm/venv/bin/slurm-mm-run', ['slurm-mm-run'])\n")
    for p in (reader, attack):
        p.chmod(0o755)
        os.chown(p, user.pw_uid, user.pw_gid)
    job = tc.job_id(tc.sbatch(cluster, f"#!/bin/sh\nexec /usr/bin/python3 {attack}\n",
                              "-o", str(job_dir / "attack.out"), cwd=job_dir))
    try:
        tc.wait_job(cluster, job, {"COMPLETED", "FAILED"}, timeout=60)
    finally:
        subprocess.run(["scancel", job], env=cluster.env())
    text = output(job_dir, "attack")
    assert f"job {job} is not enrolled" in text and "reader-ran" not in text, text
    assert "root:" not in text, "the job read a root-only file through its O_PATH stdin"
