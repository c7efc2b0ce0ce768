"""Pure logic behind the agent's bounds and the staging check (no cluster, no CRIU)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from slurm_mm.agent import admission, protocol
from slurm_mm.agent.staging import prepare_staging_root
from slurm_mm.engine.launcher import environment_fd
from slurm_mm.errors import PermissionDenied, UsageError


def test_connections_are_bounded_per_user_and_in_all_but_not_for_root():
    gate = admission.Admission(per_uid=2, total=3)
    a, b = gate.admit(1000), gate.admit(1000)
    assert a and b and gate.admit(1000) is None
    c = gate.admit(1001)
    assert c and gate.admit(1002) is None, "the total is reached"
    assert all(gate.admit(0) for _ in range(10)), "root is never counted"
    a.release()
    a.release()  # idempotent
    assert gate.in_use(1000) == 1 and gate.admit(1002)


def test_a_slow_peer_runs_out_of_time_however_it_paces_its_bytes():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.sendall(b"\x00\x00\x00\x10{")  # a header, then one byte: a slowloris
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        protocol.recv(b, deadline=time.monotonic() + 0.3)
    assert time.monotonic() - started < 1.0


def test_small_requests_stay_small():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.sendall((protocol.MAX_SMALL_MESSAGE + 1).to_bytes(4, "big"))
    with pytest.raises(protocol.ProtocolError, match="exceeds"):
        protocol.recv(b, max_size=protocol.MAX_SMALL_MESSAGE)


def test_descriptors_of_a_refused_message_are_closed():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    a.sendmsg([b"\x00\x00\x00\x03[1]"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, w.to_bytes(4, "little"))])
    os.close(w)
    with pytest.raises(protocol.ProtocolError):
        protocol.recv(b)
    assert os.read(r, 1) == b"", "the passed write end was closed, so the pipe is at EOF"


@pytest.mark.skipif(os.geteuid() != 0, reason="the staging root is root's")
def test_staging_root_is_made_root_only_and_a_users_directory_is_refused(tmp_path):
    staging = tmp_path / "a" / "staging"
    prepare_staging_root(staging)
    assert os.stat(staging).st_mode & 0o777 == 0o700
    os.chmod(staging, 0o755)
    prepare_staging_root(staging)
    assert os.stat(staging).st_mode & 0o777 == 0o700, "tightened"
    os.chown(staging, 65534, 65534)
    with pytest.raises(PermissionDenied, match="belongs to uid 65534"):
        prepare_staging_root(staging)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "a")
    with pytest.raises(PermissionDenied, match="is a symlink"):
        prepare_staging_root(link / "staging")
    os.chmod(tmp_path / "a", 0o777)
    with pytest.raises(PermissionDenied, match="writable by others and not sticky"):
        prepare_staging_root(Path(tmp_path / "a" / "other"))


def test_the_job_environment_travels_as_sealed_data():
    fd = environment_fd({"LD_PRELOAD": "/x.so", "A": "b=c"})
    try:
        assert os.pread(fd, 100, 0) == b"LD_PRELOAD=/x.so\0A=b=c\0"
        with pytest.raises(PermissionError):
            os.write(fd, b"X=1\0")
    finally:
        os.close(fd)
    for bad in ({"": "x"}, {"A=B": "x"}, {"A": "x\0y"}):
        with pytest.raises(UsageError):
            environment_fd(bad)


@pytest.mark.parametrize("cgroup, job", [
    ("4:freezer:/slurm_n1/uid_1001/job_17/step_batch\n0::/user.slice\n", "17"),
    ("4:freezer:/slurm/uid_1001/job_17/step_batch/task_0\n", "17"),
    ("4:freezer:/slurm_n2/uid_1001/job_17/step_batch\n", None),  # another node's
    ("0::/system.slice/slurmstepd.scope/job_9/step_batch/user/task_0\n", "9"),
    ("0::/system.slice/n1_slurmstepd.scope/job_9/step_batch\n", "9"),
    # A user's delegated cgroup v2 subtree may hold directories of any name.
    ("0::/user.slice/user-1001.slice/user@1001.service/app.slice/slurmstepd.scope/job_9/step_batch\n", None),
    ("0::/user.slice/slurm/job_9/step_batch\n", None),
])
def test_batch_step_is_recognised_only_where_slurm_puts_it(monkeypatch, cgroup, job):
    from slurm_mm.agent import auth

    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: cgroup)
    assert auth.batch_step_job(1, "n1") == job


def test_a_stopping_dump_waiting_for_criu_goes_before_earlier_ordinary_ones():
    import threading

    from slurm_mm.agent.criu_gate import CriuGate

    gate, order = CriuGate(), []

    def run(name: str, urgent: bool) -> None:
        with gate.hold(urgent=urgent):
            order.append(name)

    with gate.hold():  # a dump in progress
        threads = [threading.Thread(target=run, args=(f"periodic{i}", False)) for i in range(3)]
        threads.append(threading.Thread(target=run, args=("preempt", True)))
        for t in threads:
            t.start()
            time.sleep(0.05)  # queued in this order
    for t in threads:
        t.join(5)
    assert order == ["preempt", "periodic0", "periodic1", "periodic2"]
