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
from slurm_mm.errors import PermissionDenied, SlurmMMError, UsageError


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


@pytest.mark.skipif(os.geteuid() != 0, reason="markers are root's")
def test_enrollment_markers_enrol_a_run_once_and_go_with_the_epilog(tmp_path):
    from slurm_mm.agent import enrollment
    from slurm_mm.config import Config
    from slurm_mm.errors import NotEnrolled

    cfg = Config(run_dir=tmp_path / "run")
    with pytest.raises(NotEnrolled, match="job 7 is not enrolled on n1"):
        enrollment.check_enrolled(cfg, "7", "n1")
    enrollment.mark_enrolled(cfg, "7", "n1", 0, "60")
    enrollment.check_enrolled(cfg, "7", "n1")
    with pytest.raises(NotEnrolled):
        enrollment.check_enrolled(cfg, "7", "n2")  # another node's record does not count
    assert enrollment.recorded_run(cfg, "7", "n1") == 0
    enrollment.claim_start(cfg, "7", "n1", 0)
    with pytest.raises(PermissionDenied, match="already started"):
        enrollment.claim_start(cfg, "7", "n1", 0)
    enrollment.claim_start(cfg, "7", "n1", 1)  # the requeued run
    assert os.stat(tmp_path / "run" / "enrolled").st_mode & 0o777 == 0o700
    enrollment.forget(cfg, "7", "n1")
    assert enrollment.recorded_run(cfg, "7", "n1") is None
    with pytest.raises(SlurmMMError):  # a path-like job id
        enrollment.check_enrolled(cfg, "../7", "n1")


def test_a_preempted_jobs_dump_gets_the_time_left_in_its_grace():
    from types import SimpleNamespace

    from slurm_mm.agent import dump_deadline

    slurm = SimpleNamespace(job=lambda _j: SimpleNamespace(partition="low", preempt_time=1000),
                            grace_time=lambda _p: 20)
    deadline = dump_deadline.grace_end(slurm, "5")
    assert deadline == 1020.0
    assert dump_deadline.timeout(deadline, 600.0, now=1005.0) == 14.0
    assert dump_deadline.timeout(deadline, 600.0, now=1030.0) == dump_deadline.FLOOR
    assert dump_deadline.timeout(deadline, 10.0, now=1000.0) == 10.0, "never longer than configured"
    assert dump_deadline.timeout(None, 600.0) == 600.0
    no_grace = SimpleNamespace(job=slurm.job, grace_time=lambda _p: 0)
    assert dump_deadline.grace_end(no_grace, "5") is None


@pytest.mark.skipif(os.geteuid() != 0, reason="the store is root's")
def test_store_quota_counts_a_users_images_beyond_what_retention_removes(tmp_path):
    from slurm_mm.agent.quota import StoreQuota
    from slurm_mm.errors import QuotaExceeded
    from slurm_mm.store import ImageStore

    store = ImageStore(tmp_path / "store", keep=2)
    src = tmp_path / "src"
    src.mkdir()
    (src / "pages-1.img").write_bytes(os.urandom(4096))
    for job, uid in (("1", 1000), ("1", 1000), ("2", 1000), ("3", 1001)):
        store.prepare_job(job, uid, uid)
        store.commit(job, src, epoch=0, uid=uid, gid=uid, node="n1", trigger="periodic", criu_version="4.2.1",
                     extra={})
    size = store.images("2")[0].manifest.stored_size
    quota = StoreQuota(store, 3 * size, keep=2)
    assert quota.usage(1000) == 3 * size and quota.usage(1001) == size
    assert quota.usage(1000, leaving="1") == 2 * size, "job 1's oldest image goes with its next commit"
    quota.check("1", 1000)
    with pytest.raises(QuotaExceeded, match="store_quota_per_user"):
        quota.check("2", 1000)
    StoreQuota(store, 0, keep=2).check("2", 1000)  # 0 = no quota


@pytest.mark.skipif(os.geteuid() != 0, reason="the store is root's")
def test_store_quota_counts_file_pins_and_copies_of_a_users_jobs(tmp_path):
    """Pins keep a deleted shared file's blocks alive outside any image: they count, each
    inode once; pins the next commit prunes (not named by a kept image) do not."""
    from slurm_mm.agent.quota import StoreQuota
    from slurm_mm.agent.store_usage import usage_by_owner
    from slurm_mm.store import ImageStore

    store = ImageStore(tmp_path / "store", keep=2)
    src = tmp_path / "src"
    src.mkdir()
    (src / "pages-1.img").write_bytes(os.urandom(4096))
    (src / "mmfile-0").write_bytes(os.urandom(1 << 20))  # a copy of a node-local file
    store.prepare_job("7", 1000, 1000)
    for pins in ("a", "b"):
        store.commit("7", src, epoch=0, uid=1000, gid=1000, node="n1", trigger="periodic",
                     criu_version="4.2.1", extra={"files": {"pins": pins}})
    images = store.images("7")
    assert sum(f.size for f in images[0].manifest.files if f.name.startswith("mmfile-")) == 1 << 20
    stored = sum(i.manifest.stored_size for i in images)
    assert stored > 2 << 20, "copies are part of each image's stored size"
    big = tmp_path / "shared.dat"
    big.write_bytes(os.urandom(8 << 20))
    pin_root = store.root / "7" / ".pins"
    for name in ("a", "b"):
        (pin_root / name).mkdir(parents=True)
        os.link(big, pin_root / name / "0")  # both images pin the same inode
    big.unlink()
    pinned = os.stat(pin_root / "a" / "0").st_blocks * 512
    quota = StoreQuota(store, 1, keep=2)
    assert quota.usage(1000) == stored + pinned
    assert quota.usage(1001) == 0
    # The next commit keeps only the newest image ("b"): its pin still counts.
    assert quota.usage(1000, leaving="7") == images[0].manifest.stored_size + pinned
    os.unlink(pin_root / "b" / "0")
    assert quota.usage(1000, leaving="7") == images[0].manifest.stored_size, "pin 'a' goes with the next commit"
    assert quota.usage(1000) == stored + pinned, "until then it is held"
    assert usage_by_owner(store)[0] == {1000: stored + pinned}


@pytest.mark.skipif(os.geteuid() != 0, reason="the store is root's")
def test_store_sweep_removes_only_jobs_slurm_says_ended_for_good(tmp_path):
    from dataclasses import replace

    from slurm_mm.agent.store_sweep import sweep
    from slurm_mm.errors import JobGone, SlurmError
    from slurm_mm.slurm.model import Job
    from slurm_mm.store import ImageStore

    store = ImageStore(tmp_path / "store", keep=2)
    src = tmp_path / "src"
    src.mkdir()
    (src / "pages-1.img").write_bytes(b"x" * 100)
    answers = {"1": "CANCELLED", "2": "PENDING", "3": "NODE_FAIL", "4": None, "5": "error", "6": "COMPLETED",
               "7": "FAILED", "8": "RUNNING", "9": "PREEMPTED"}
    for job in answers:
        store.prepare_job(job, 1000, 1000)
        store.commit(job, src, epoch=0, uid=1000, gid=1000, node="n2" if job == "6" else "n1",
                     trigger="periodic", criu_version="4.2.1", extra={})
    store.prepare_job("10", 1000, 1000)  # no image yet: any node judges it
    answers["10"] = "TIMEOUT"
    base = Job("0", 1000, 1000, "", "", 0, 0, 0, "", "", True, None, "")

    class Slurm:
        def job(self, job_id):
            state = answers[job_id]
            if state is None:
                raise JobGone(f"job {job_id} not found")
            if state == "error":
                raise SlurmError("squeue failed: Unable to contact slurm controller")
            return replace(base, job_id=job_id, state=state)

    assert sweep(store, Slurm(), "n1") == ["1", "10", "4", "7"]
    left = sorted(p.name for p in store.root.iterdir() if p.name.isdigit())
    assert left == ["2", "3", "5", "6", "8", "9"], "n2 wrote job 6's image: n1 leaves it to n2's agent"
    assert sweep(store, Slurm(), None) == ["6"], "slurm-mm gc judges every job"


def test_slurm_says_a_job_is_gone_only_when_it_answered():
    from slurm_mm.errors import JobGone, SlurmError
    from slurm_mm.slurm.commands import CommandClient

    class Client(CommandClient):
        def __init__(self, answer):
            self.answer = answer

        def _run(self, *argv):
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer

    invalid = SlurmError("'squeue --json --states=all' failed: slurm_load_jobs error: Invalid job id specified")
    for answer in (invalid, '{"jobs": []}'):
        with pytest.raises(JobGone):
            Client(answer).job("42")
    down = SlurmError("'squeue --json --states=all' failed: Unable to contact slurm controller (connect failure)")
    for answer in (down, '{"jobs": [], "errors": [{"error": "Unable to contact slurm controller"}]}'):
        with pytest.raises(SlurmError) as caught:
            Client(answer).job("42")
        assert not isinstance(caught.value, JobGone)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping a bounding-set bit needs root")
def test_owner_check_refuses_a_task_whose_bounding_set_is_wider_than_the_checkers():
    import ctypes
    import subprocess

    from slurm_mm.engine import owner_check

    task = subprocess.Popen(["sleep", "30"], user=65534, group=65534, extra_groups=[])
    try:
        time.sleep(0.2)
        assert owner_check.problems(task.pid, 65534, {65534})[0] == []
        r, w = os.pipe()
        child = os.fork()
        if child == 0:  # a checker without CAP_NET_RAW (13) in its bounding set
            os.close(r)
            ctypes.CDLL(None, use_errno=True).prctl(24, 13, 0, 0, 0)  # PR_CAPBSET_DROP
            found = owner_check.problems(task.pid, 65534, {65534})[0]
            os.write(w, "\n".join(found).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as pipe:
            text = pipe.read()
        os.waitpid(child, 0)
        assert "bounding set 0x2000 wider" in text, text
    finally:
        task.kill()
        task.wait()


def test_a_peers_string_cannot_forge_a_log_line():
    from slurm_mm.agent.node_agent import _printable

    text = _printable("7\n2026-11-28 agent INFO job 9 checkpointed" + "x" * 200)
    assert "\n" not in text and text.startswith("'7\\n") and len(text) < 80


def test_an_ordinary_dump_gives_criu_up_to_a_waiting_stopping_dump(tmp_path):
    import subprocess
    import sys
    import threading

    from slurm_mm.agent.criu_gate import CriuGate
    from slurm_mm.agent.criu_yield import yields_to_urgent

    (tmp_path / "dump").write_text("import time\ntime.sleep(30)\n")
    fake_criu = "/opt/fake/criu"  # argv of a hung `criu dump --tree 123`
    hung = subprocess.Popen([fake_criu, "dump", "--tree", "123"], executable=sys.executable, cwd=tmp_path)
    other = subprocess.Popen([fake_criu, "dump", "--tree", "1234"], executable=sys.executable, cwd=tmp_path)
    gate, served = CriuGate(), threading.Event()

    def stopping_dump() -> None:
        with gate.hold(urgent=True):
            served.set()

    try:
        with gate.hold(), yields_to_urgent(gate, Path(fake_criu), 123, after=0.3):
            assert not gate.urgent_waiting()
            threading.Thread(target=stopping_dump, daemon=True).start()
            assert hung.wait(timeout=5) == -9, "the hung ordinary dump was killed"
            assert other.poll() is None, "another tree's criu is left alone"
        assert served.wait(5)
    finally:
        for proc in (hung, other):
            proc.kill()
            proc.wait()


def test_a_stopping_dump_that_waits_between_two_criu_runs_gets_the_next_one_cut_short(tmp_path):
    """The ordinary dump holds the gate but runs no criu when the stopping dump starts to
    wait (its GPU step, its file capture): its next criu is the one killed."""
    import subprocess
    import sys
    import threading

    from slurm_mm.agent.criu_gate import CriuGate
    from slurm_mm.agent.criu_yield import yields_to_urgent

    (tmp_path / "dump").write_text("import time\ntime.sleep(30)\n")
    fake_criu = "/opt/fake/criu"
    gate, served, hung = CriuGate(), threading.Event(), None

    def stopping_dump() -> None:
        with gate.hold(urgent=True):
            served.set()

    try:
        with gate.hold(), yields_to_urgent(gate, Path(fake_criu), 123, after=0.2):
            threading.Thread(target=stopping_dump, daemon=True).start()
            time.sleep(1.0)  # the watcher looked, found no criu, and must go on looking
            hung = subprocess.Popen([fake_criu, "dump", "--tree", "123"], executable=sys.executable,
                                    cwd=tmp_path)
            assert hung.wait(timeout=5) == -9, "the next criu of the ordinary dump was killed"
        assert served.wait(5)
    finally:
        if hung is not None and hung.poll() is None:
            hung.kill()
            hung.wait()


def test_a_long_wait_for_criu_names_the_holder_in_the_log(caplog, monkeypatch):
    import threading

    from slurm_mm.agent import criu_gate

    monkeypatch.setattr(criu_gate, "WAIT_REPORT", 0.2)
    gate, served = criu_gate.CriuGate(), threading.Event()

    def stopping_dump() -> None:
        with gate.hold(urgent=True, what="a stopping dump of pid 7"):
            served.set()

    with caplog.at_level("WARNING", logger="slurm_mm.agent.criu_gate"):
        with gate.hold(what="an ordinary dump of pid 5"):
            waiter = threading.Thread(target=stopping_dump, daemon=True)
            waiter.start()
            time.sleep(0.6)
        assert served.wait(5)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert lines[0].startswith("a stopping dump of pid 7 has waited") and "held by an ordinary dump of pid 5" in lines[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="checks run as another user")
def test_socket_directories_are_checked_as_the_owner_before_criu_binds():
    import shutil
    import subprocess
    import tempfile

    from slurm_mm.engine import filestate

    tmp_path = Path(tempfile.mkdtemp(prefix="slurm_mm-sock-", dir="/tmp"))  # reachable by nobody
    users = tmp_path / "users"
    users.mkdir()
    os.chown(users, 65534, 65534)
    root_only = tmp_path / "root-only"
    root_only.mkdir(mode=0o700)
    os.chmod(tmp_path, 0o755)
    code = ("import socket, sys, time\ns = socket.socket(socket.AF_UNIX)\ns.bind(sys.argv[1])\n"
            "print('up', flush=True)\ntime.sleep(30)\n")
    proc = subprocess.Popen(["python3", "-c", code, str(users / "s")], user=65534, group=65534, extra_groups=[],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        assert filestate.bound_sockets(proc.pid) == [str(users / "s")]
        state = filestate.FileState(node="n1", sockets=[str(users / "s"), str(root_only / "s")])
        plan = filestate.plan(state, tmp_path, node="n1", uid=65534, gids=[65534], pin_root=None)
        assert len(plan.problems) == 1 and f"unix socket {root_only}/s: its owner may not bind" in plan.problems[0]
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp_path)
