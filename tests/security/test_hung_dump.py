"""Finding: one user could starve the node's CRIU gate. A dump that hangs (a file on a FUSE
or dead NFS mount; here criu is stopped by root, which hangs it the same way) held the
gate for the whole `timeouts.checkpoint` (600 s), past any GraceTime; and the prlimit
shim once ran criu with the user's real uid, so the user could stop it themselves.
Now a preemption dump is killed when the job's grace ends, any other at the configured
timeout or as soon as a stopping dump waits for the gate; the job runs on (or,
preempted, resumes from its earlier image), and criu is never signalable by the job's
user."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import threading
import time

import pytest

from conftest import testcluster as tc
from slurm_jobs import assert_correct_result, image_names, logged_steps, output, submit_chain

pytestmark = pytest.mark.cluster


def _criu_dumps(stopping_only: bool) -> list[int]:
    """Running `criu dump` processes started by an agent (not criu's own forked helpers)."""
    out = subprocess.run(["pgrep", "-f", "^/opt/slurm_mm/criu/sbin/criu dump"], capture_output=True, text=True)
    pids = []
    for pid in out.stdout.split():
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            status = dict(l.split(":\t", 1) for l in open(f"/proc/{pid}/status").read().splitlines() if ":\t" in l)
            parent = open(f"/proc/{status['PPid'].strip()}/comm").read().strip()
        except (OSError, KeyError):
            continue
        if parent.startswith("python") and status["State"].startswith(("R", "S", "D")) and \
                (not stopping_only or b"--leave-running" not in argv):
            pids.append(int(pid))
    return pids


def _release(found: dict) -> None:
    """Never leave a criu stopped by this test behind, whatever happened."""
    if "pid" in found:
        try:
            os.kill(found["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


def _hang_next_dump(stopping_only: bool, found: dict, timeout: float = 60.0) -> threading.Thread:
    """Stop (SIGSTOP) the next criu dump as soon as it appears; record its pid and whether
    the job's user could signal it."""

    def run() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = _criu_dumps(stopping_only)
            if pids:
                pid = pids[0]
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    continue  # done already: wait for the next one
                found["pid"], found["at"] = pid, time.monotonic()
                found["user_kill"] = subprocess.run(["runuser", "-u", tc.USER, "--", "kill", "-0", str(pid)],
                                                    capture_output=True, text=True)
                return
            time.sleep(0.005)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1].startswith("Z")
    except OSError:
        return True


def test_a_hung_periodic_dump_is_killed_at_the_timeout_and_the_job_runs_on(cluster, job_dir):
    tc.set_agent_config(cluster, "timeouts", "{checkpoint: 4}")
    found: dict = {}
    try:
        job = submit_chain(cluster, job_dir, steps=100, delay=0.25, interval="5s")
        tc.wait_for(lambda: len(image_names(cluster, job)) >= 1, 40, "a first image")
        earlier = image_names(cluster, job)[0]
        _hang_next_dump(False, found).join(30)
        assert "pid" in found, "no further dump seen"
        res = found["user_kill"]
        assert res.returncode != 0 and "not permitted" in res.stderr, "the job's user may signal criu"
        tc.wait_for(lambda: _gone(found["pid"]), 15, "the hung criu to be killed")
        assert time.monotonic() - found["at"] < 12
        tc.wait_for(lambda: "timed out after 4 s" in output(job_dir), 10, "the job to be told")
        assert "the job keeps running" in output(job_dir)
        assert earlier in image_names(cluster, job)
        verify = subprocess.run(["slurm-mm", "verify", str(cluster.checkpoint_root / job / earlier)],
                                env=cluster.env(), capture_output=True, text=True)
        assert verify.returncode == 0, verify.stderr
        tc.wait_job(cluster, job, {"COMPLETED"}, timeout=90)
        assert_correct_result(job_dir, 100)
    finally:
        _release(found)
        tc.set_agent_config(cluster, "timeouts", "{checkpoint: 600}")


def test_a_hung_preemption_dump_is_killed_when_grace_ends(cluster, job_dir):
    """The low partition's GraceTime is 20 s; the configured timeout stays 600 s."""
    job = submit_chain(cluster, job_dir, 160, 0.25, "--open-mode=append", interval="5s")
    tc.wait_for(lambda: len(image_names(cluster, job)) >= 1, 40, "a first image")
    node = tc.job_info(cluster, job)["BatchHost"]
    found: dict = {}
    hang = _hang_next_dump(True, found, timeout=40)
    # The whole node (2 CPUs): the job must make room.
    high = tc.job_id(tc.sbatch(cluster, "#!/bin/bash\nsleep 20\n", "-p", "high", "-w", node, "-c", "2",
                               "-o", "/dev/null", cwd=job_dir))
    preempted_at = time.monotonic()
    try:
        hang.join(40)
        assert "pid" in found, "no preemption dump seen"
        tc.wait_for(lambda: _gone(found["pid"]), 40, "the hung criu to be killed")
        assert time.monotonic() - preempted_at < 20 + 6, "criu outlived the job's grace"
    finally:
        _release(found)
    tc.wait_for(lambda: "restored from ckpt-" in output(job_dir), 120, "a restore of the earlier image")
    tc.wait_job(cluster, job, {"COMPLETED"}, timeout=120)
    assert_correct_result(job_dir, 160)
    assert logged_steps(job_dir)[-1] == 160
    subprocess.run(["scancel", high], env=cluster.env())


def _scontrol(cluster, *args: str) -> None:
    subprocess.run(["scontrol", *args], env=cluster.env(), check=True, capture_output=True)


def test_a_hung_dump_of_one_job_does_not_hold_another_jobs_preemption(cluster, user_home):
    """Job A (high partition, not preemptible) hangs its periodic dump on n1; job B (low)
    is preempted on the same node: B's dump must get the node's CRIU gate within grace."""
    dirs = {}
    for name in ("hung", "preempted"):
        d = user_home / "tests" / f"hung_gate_{name}"
        subprocess.run(["rm", "-rf", str(d)], check=True)
        d.mkdir(parents=True)
        user = pwd.getpwnam(tc.USER)
        os.chown(d, user.pw_uid, user.pw_gid)
        dirs[name] = d
    _scontrol(cluster, "update", "NodeName=n2,n3", "State=DRAIN", "Reason=test-parking")
    try:
        a = submit_chain(cluster, dirs["hung"], 200, 0.25, "-p", "high", interval="5s")
        b = submit_chain(cluster, dirs["preempted"], 160, 0.25, "--open-mode=append", interval="10m")
        for job in (a, b):
            assert tc.wait_job(cluster, job, {"RUNNING"}, timeout=30)["BatchHost"] == "n1"
    finally:
        _scontrol(cluster, "update", "NodeName=n2,n3", "State=RESUME")
    tc.wait_for(lambda: len(image_names(cluster, a)) >= 1, 40, "a first image of the hung job")
    tc.wait_for(lambda: len(logged_steps(dirs["preempted"])) >= 4, 30, "progress of the preempted job")
    found: dict = {}
    try:
        _hang_next_dump(False, found).join(30)
        assert "pid" in found, "no further dump of the hung job seen"
        high = tc.job_id(tc.sbatch(cluster, "#!/bin/bash\nsleep 15\n", "-p", "high", "-w", "n1",
                                   "-o", "/dev/null", cwd=dirs["hung"]))
        preempted_at = time.monotonic()
        tc.wait_for(lambda: "for preempt" in output(dirs["preempted"]), 25, "the preempted job's image")
        assert time.monotonic() - preempted_at < 20, "the preemption image came after GraceTime"
        assert _gone(found["pid"]), "the hung dump still holds criu"
    finally:
        _release(found)
    tc.wait_job(cluster, b, {"COMPLETED"}, timeout=150)
    assert "restored from ckpt-" in output(dirs["preempted"])
    assert_correct_result(dirs["preempted"], 160)
    tc.wait_job(cluster, a, {"COMPLETED"}, timeout=120)
    assert "periodic checkpoint failed" in output(dirs["hung"])
    assert_correct_result(dirs["hung"], 200)
    subprocess.run(["scancel", high], env=cluster.env())
