"""Finding: any local user could take the node agent down (EMFILE) with idle connections,
and every enrolled job of the node failed with it. The agent now bounds connections per
user and in all, drops peers that send nothing, and keeps serving jobs throughout."""

from __future__ import annotations

import subprocess
import textwrap
import time

import pytest

from conftest import testcluster as tc
from slurm_jobs import as_user, assert_correct_result, image_names, logged_steps, output, submit_chain

pytestmark = pytest.mark.cluster

FLOOD = textwrap.dedent("""
    import resource, socket, sys, time
    path, count, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # any user may
    socks, refused = [], 0
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # blocking: waits for the backlog
        try:
            s.connect(path)
            socks.append(s)
        except OSError:
            refused += 1
            s.close()
    print(f"opened={len(socks)} refused={refused}", flush=True)
    time.sleep(hold)
    closed = 0
    for s in socks:
        s.setblocking(False)
        try:
            while s.recv(65536):  # an error reply may come before the close
                pass
            closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    print(f"closed_by_agent={closed}", flush=True)
""")


def _soft_nofile(pid: int) -> int:
    for line in open(f"/proc/{pid}/limits"):
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no fd limit for {pid}")


def test_a_user_flooding_the_agent_socket_does_not_stop_a_running_job(cluster, job_dir):
    job = submit_chain(cluster, job_dir, steps=80, delay=0.25, interval="5s")
    tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)
    tc.wait_for(lambda: len(logged_steps(job_dir)) >= 2, 30, "the job under slurm_mm")
    node = tc.job_info(cluster, job)["BatchHost"]
    agent = tc.read_pid(cluster.pid_file(f"agent-{node}"))
    assert agent is not None
    soft = _soft_nofile(agent)
    # As under systemd without LimitNOFILE: a soft limit of 1024 descriptors.
    subprocess.run(["prlimit", f"--pid={agent}", "--nofile=1024:"], check=True)
    flood = subprocess.Popen(
        ["runuser", "-u", tc.USER, "--", "/usr/bin/python3", "-c", FLOOD,
         str(cluster.run / f"agent-{node}.sock"), "1500", "25"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        before = set(image_names(cluster, job))
        new_images: set[str] = set()
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:  # periodic checkpoints go on under the flood
            new_images |= set(image_names(cluster, job)) - before
            time.sleep(0.5)
        out, err = flood.communicate(timeout=60)
        info = tc.wait_job(cluster, job, {"COMPLETED", "FAILED"}, timeout=60)
    finally:
        if flood.poll() is None:
            flood.kill()
        subprocess.run(["scancel", job], env=cluster.env())
        if tc.read_pid(cluster.pid_file(f"agent-{node}")) == agent:
            subprocess.run(["prlimit", f"--pid={agent}", f"--nofile={soft}:"], check=False)
    assert "opened=" in out, (out, err)
    assert info["JobState"] == "COMPLETED", (info, output(job_dir))
    assert_correct_result(job_dir, 80)
    assert new_images, "no periodic checkpoint was taken during the flood"
    assert tc.read_pid(cluster.pid_file(f"agent-{node}")) == agent, "the agent died"
    # Idle peers were dropped, so the flooding user is served again afterwards.
    opened = int(out.split("opened=")[1].split()[0])
    assert f"closed_by_agent={opened}" in out, out
    ask = ("from pathlib import Path; from slurm_mm.agent.client import request; "
           f"print(request(Path('{cluster.run}/agent-{node}.sock'), {{'op': 'status'}}, timeout=10)['op'])")
    res = as_user(cluster, "/opt/slurm_mm/venv/bin/python", "-c", ask)
    assert res.returncode == 0 and res.stdout.strip() == "status", res
