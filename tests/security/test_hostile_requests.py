"""Hostile inputs against root-run code, on the real cluster: other users, crafted
images (a root tree, a root namespace init that is not mm-init), user-supplied paths,
a forged start request."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import testcluster as tc
from slurm_jobs import (as_user, assert_correct_result, image_names, logged_steps, output,
                        submit_chain)
from slurm_mm.engine.checkpoint import checkpoint_tree
from slurm_mm.engine.launcher import launch
from slurm_mm.store import ImageStore

pytestmark = pytest.mark.cluster
OTHER = "mmother"


@pytest.fixture(scope="module")
def other_user() -> str:
    try:
        pwd.getpwnam(OTHER)
    except KeyError:
        subprocess.run(["useradd", "-m", OTHER], check=True)
    return OTHER


@pytest.fixture()
def running_job(cluster, job_dir):
    job = submit_chain(cluster, job_dir, steps=400, delay=0.25, interval="10m")
    tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)
    # RUNNING in slurmctld comes before the batch task reached the agent.
    tc.wait_for(lambda: len(logged_steps(job_dir)) >= 2, 30, "the job under slurm_mm")
    yield job
    subprocess.run(["scancel", job], env=cluster.env())


def test_other_user_cannot_checkpoint_list_or_read_images(cluster, job_dir, running_job, other_user):
    job = running_job
    assert as_user(cluster, "slurm-mm", "checkpoint", job).returncode == 0  # the owner may
    res = as_user(cluster, "slurm-mm", "checkpoint", job, "--requeue", user=other_user)
    assert res.returncode != 0
    assert f"may not act on job {job}" in res.stderr and "Traceback" not in res.stderr
    assert tc.job_info(cluster, job)["Restarts"] == "0"
    res = as_user(cluster, "slurm-mm", "images", job, user=other_user)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = as_user(cluster, "ls", str(cluster.checkpoint_root / job), user=other_user)
    assert res.returncode != 0 and "Permission denied" in res.stderr
    res = as_user(cluster, "slurm-mm", "images", job)  # the owner can list them
    assert res.returncode == 0 and "ckpt-" in res.stdout


def _root_tree(kind: str, marker: Path, uid: int, gid: int) -> int:
    """A root-owned tree to image: mm-init with a root app, or a root namespace init that
    is not mm-init over an app of the user's (only the init check can catch that one)."""
    if kind != "foreign-init":
        script = f"while true; do sleep 0.2; done; touch {marker}"
        return launch(["/bin/sh", "-c", script], uid=0, gid=0, allow_root=True, cwd="/").init_pid
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        f"    os.setgroups([{gid}]); os.setgid({gid}); os.setuid({uid})\n"
        "    while True: time.sleep(1)\n"
        "while True:\n"
        "    time.sleep(0.2)\n"
        f"    open({str(marker)!r}, 'a').write('x')\n"
    )
    outer = subprocess.Popen(["unshare", "--pid", "--fork", "setsid", "/usr/bin/python3", "-c", code],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True, cwd="/")
    tc.wait_for(lambda: marker.exists(), 10, "the foreign init to run")
    (init,) = [int(p) for p in Path(f"/proc/{outer.pid}/task/{outer.pid}/children").read_text().split()]
    return init


def _crafted_root_image(cluster, job: str, uid: int, gid: int, kind: str) -> str:
    """An image of a ROOT-owned tree committed into the user's job dir (its manifest
    either lies, naming the user, or is then edited to say root)."""
    work = Path(cluster.state) / "crafted"
    marker = work / "root-ran"
    work.mkdir(exist_ok=True)
    marker.unlink(missing_ok=True)
    init = _root_tree(kind, marker, uid, gid)
    images = work / "images"
    if images.exists():
        subprocess.run(["rm", "-rf", str(images)], check=True)
    checkpoint_tree(init, images, leave_running=False)
    tc.wait_for(lambda: not os.path.exists(f"/proc/{init}"), 10, "the dumped tree to go")
    store = ImageStore(cluster.checkpoint_root)
    image = store.commit(job, images, epoch=0, uid=uid, gid=gid, node="n1", trigger="manual",
                         criu_version="4.2.1", extra={})
    if kind == "root":
        manifest = image.path / "manifest.json"
        data = json.loads(manifest.read_text())
        data["uid"] = data["gid"] = 0
        manifest.write_text(json.dumps(data))
    return image.path.name


@pytest.mark.parametrize("kind", ["lying", "root", "foreign-init"])
def test_crafted_root_image_is_refused_before_restore(cluster, job_dir, running_job, kind):
    job = running_job
    user = pwd.getpwnam(tc.USER)
    tc.wait_for(lambda: len(logged_steps(job_dir)) >= 4, 30, "progress")
    assert as_user(cluster, "slurm-mm", "checkpoint", job).returncode == 0  # a real image
    crafted = _crafted_root_image(cluster, job, user.pw_uid, user.pw_gid, kind)
    marker = Path(cluster.state) / "crafted" / "root-ran"
    ran = marker.read_text() if marker.exists() else ""
    assert image_names(cluster, job)[-1] == crafted
    subprocess.run(["scontrol", "requeue", job], env=cluster.env(), check=True)
    tc.wait_for(lambda: "restored from" in output(job_dir), 90, "a restore")
    text = output(job_dir)
    assert f"{crafted}" in text and ("refusing" in text or "cannot restore" in text or "not restoring" in text), text
    assert f"restored from {crafted}" not in text
    if kind == "foreign-init":
        assert "is not the installed mm-init" in text, text
    # Nothing of the crafted tree runs as root.
    procs = subprocess.run(["pgrep", "-u", "0", "-f", "while true; do sleep 0.2|time.sleep.0.2"],
                           capture_output=True, text=True).stdout
    assert procs.strip() == ""
    assert (marker.read_text() if marker.exists() else "") == ran


def test_user_supplied_paths_with_dotdot_or_symlinks_are_refused(cluster, running_job, tmp_path):
    job = running_job
    as_user(cluster, "slurm-mm", "checkpoint", job)
    res = subprocess.run(["slurm-mm", "images", "../../etc"], env=cluster.env(), capture_output=True, text=True)
    assert res.returncode != 0 and "'..'" in res.stderr and "Traceback" not in res.stderr
    link = tmp_path / "link"
    link.symlink_to(cluster.checkpoint_root / job)
    res = subprocess.run(["slurm-mm", "images", str(link)], env=cluster.env(), capture_output=True, text=True)
    assert res.returncode != 0 and "symlink" in res.stderr.lower() and "Traceback" not in res.stderr
    image = sorted((cluster.checkpoint_root / job).glob("ckpt-*"))[-1]
    (tmp_path / "img").symlink_to(image)
    res = subprocess.run(["slurm-mm", "verify", str(tmp_path / "img")], env=cluster.env(),
                         capture_output=True, text=True)
    assert res.returncode != 0 and "Traceback" not in res.stderr


def test_start_request_from_outside_the_batch_step_is_refused(cluster, running_job):
    job = running_job
    node = tc.job_info(cluster, job)["BatchHost"]
    code = textwrap.dedent(f"""
        import os, sys
        from slurm_mm.agent import protocol
        from slurm_mm.batch_wrapper import connect
        s = connect("{cluster.run}/agent-{node}.sock")
        protocol.send(s, {{"op": "start", "job_id": "{job}", "argv": ["/bin/true"], "env": {{}},
                          "cwd": "/"}}, fds=[0, 1, 2])
        print(protocol.recv(s)[0])
    """)
    res = as_user(cluster, "/opt/slurm_mm/venv/bin/python", "-c", code)
    assert "refused" in res.stdout and f"is not the batch step of job {job}" in res.stdout, res


def test_owner_checkpoint_from_a_host_without_the_agent_goes_through_srun(cluster, job_dir, running_job):
    """On a login node the agent's socket is not there: `slurm-mm checkpoint` runs itself
    as a step of the job on its node (Slurm authenticates the owner). The login side here
    is a mount namespace in which the agents' socket directory is hidden."""
    job = running_job
    hidden = f"mount -t tmpfs none {cluster.run} && "
    env = (f"PATH=/opt/slurm_mm/venv/bin:/usr/bin:/bin SLURM_CONF={cluster.slurm_conf} "
           f"SLURM_MM_CONFIG={cluster.mm_config} HOME=/home/{tc.USER}")
    res = subprocess.run(["unshare", "-m", "sh", "-c",
                          hidden + f"runuser -u {tc.USER} -- env -i {env} slurm-mm checkpoint {job} --requeue"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "checkpointed and requeued" in res.stdout
    tc.wait_for(lambda: tc.job_info(cluster, job).get("Restarts") == "1", 60, "the requeue")
    tc.wait_for(lambda: "restored from" in output(job_dir), 90, "the restore")
