"""Finding: root CRIU restores files by the paths in the image, and the job's owner can
swap a directory on such a path for a symlink to a place only root may read between
the image and its restore; CRIU checks the size and nothing else. A restored job must
never hold anything its owner could not open at restore time: the restore is refused,
naming the path."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import testcluster as tc
from slurm_jobs import as_user, output

pytestmark = pytest.mark.cluster
ORIGINAL = "ORIGINAL-DATA-0001\n"
SECRET = "ROOTSECRET-DATA-01\n"  # same size: CRIU's own check passes

HOLDER = """\
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
for step in range(1, 400):
    print(f"step {step} reads {os.pread(fd, 64, 0).decode(errors='replace').strip()}", flush=True)
    time.sleep(0.25)
"""


@pytest.fixture()
def users_dir():
    """A directory of the user's under a system prefix (as an admin-made scratch area
    would be): the file-state check before CRIU leaves such paths alone, so the owner
    check after CRIU is what must catch the swap."""
    path = Path("/var/lib/slurm_mm-sec-user")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    user = pwd.getpwnam(tc.USER)
    os.chown(path, user.pw_uid, user.pw_gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture()
def root_only_dir():
    path = Path("/var/lib/slurm_mm-sec-test")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)
    (path / "data").write_text(SECRET)
    (path / "data").chmod(0o644)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_restore_refuses_a_file_the_owner_swapped_for_a_root_only_one(cluster, job_dir, users_dir,
                                                                    root_only_dir):
    user = pwd.getpwnam(tc.USER)
    held = users_dir / "held"
    held.mkdir()
    (held / "data").write_text(ORIGINAL)
    (job_dir / "holder.py").write_text(HOLDER)
    for p in (held, held / "data", job_dir / "holder.py"):
        os.chown(p, user.pw_uid, user.pw_gid)
    job = tc.job_id(tc.sbatch(cluster, f"#!/bin/sh\nexec /usr/bin/python3 {job_dir}/holder.py {held}/data\n",
                              "--checkpoint-interval=10m", "-o", str(job_dir / "holder.out"), cwd=job_dir))
    try:
        tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)
        tc.wait_for(lambda: "step 3 reads" in output(job_dir, "holder"), 30, "the job reading its file")
        res = as_user(cluster, "slurm-mm", "checkpoint", job, "--requeue")
        assert res.returncode == 0, res.stderr
        # The owner swaps the directory for a symlink to a root-only one before the restore.
        swap = f"mv {held} {held}.orig && ln -s {root_only_dir} {held}"
        subprocess.run(["runuser", "-u", tc.USER, "--", "sh", "-c", swap], check=True)
        tc.wait_for(lambda: "cannot restore" in output(job_dir, "holder")
                    or "restored from" in output(job_dir, "holder"), 90, "the restore")
        tc.wait_for(lambda: "step 6 reads" in output(job_dir, "holder")
                    or "starting the job script" in output(job_dir, "holder"), 30, "the job to go on")
    finally:
        subprocess.run(["scancel", job], env=cluster.env())
    text = output(job_dir, "holder")
    assert "ROOTSECRET" not in text, "the restored job read a root-only file"
    refusal = [l for l in text.splitlines() if "cannot restore" in l]
    assert refusal and f"{root_only_dir}/data" in refusal[0], text


LISTENER = """\
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(1)
for step in range(1, 400):
    print(f"step {step} listens", flush=True)
    time.sleep(0.25)
"""


def test_a_bound_socket_whose_directory_was_swapped_is_refused_before_criu_binds(cluster, job_dir, users_dir,
                                                                                  root_only_dir):
    """Root CRIU unlinks and binds a restored socket's path again: with the directory
    swapped for a link into a root-only one, it must not get that far."""
    user = pwd.getpwnam(tc.USER)
    sockdir = users_dir / "sock"
    sockdir.mkdir()
    decoy = root_only_dir / "s"
    decoy.write_text("root's file\n")
    (job_dir / "listener.py").write_text(LISTENER)
    for p in (sockdir, job_dir / "listener.py"):
        os.chown(p, user.pw_uid, user.pw_gid)
    job = tc.job_id(tc.sbatch(cluster, f"#!/bin/sh\nexec /usr/bin/python3 {job_dir}/listener.py {sockdir}/s\n",
                              "--checkpoint-interval=10m", "-o", str(job_dir / "listener.out"), cwd=job_dir))
    try:
        tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)
        tc.wait_for(lambda: "step 3 listens" in output(job_dir, "listener"), 30, "the job listening")
        res = as_user(cluster, "slurm-mm", "checkpoint", job, "--requeue")
        assert res.returncode == 0, res.stderr
        swap = f"mv {sockdir} {sockdir}.orig && ln -s {root_only_dir} {sockdir}"
        subprocess.run(["runuser", "-u", tc.USER, "--", "sh", "-c", swap], check=True)
        tc.wait_for(lambda: "cannot restore" in output(job_dir, "listener")
                    or "restored from" in output(job_dir, "listener"), 90, "the restore")
    finally:
        subprocess.run(["scancel", job], env=cluster.env())
    text = output(job_dir, "listener")
    refusal = [l for l in text.splitlines() if "cannot restore" in l]
    assert refusal and f"unix socket {sockdir}/s: its owner may not bind it there now" in refusal[0], text
    assert decoy.is_file() and decoy.read_text() == "root's file\n", "root CRIU replaced a root-only file"
