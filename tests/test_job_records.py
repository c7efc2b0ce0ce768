"""Job records of a node agent and taking over a tree it did not start (no Slurm, no CRIU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from slurm_mm.agent import adopt, job_records
from slurm_mm.agent.job_records import JobRecords, TreeRecord, start_time

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="records are root-owned")


def record_of(job_id: str, pid: int, waiter: int | None = None) -> TreeRecord:
    waiter = waiter or pid
    return TreeRecord(job_id=job_id, uid=1000, epoch=2, mode="restored", init_pid=pid,
                      init_start=start_time(pid), waiter_pid=waiter, waiter_start=start_time(waiter),
                      last_image={"name": "ckpt-000003"})


def test_a_record_survives_as_written_and_is_root_only(tmp_path):
    records = JobRecords(tmp_path, "n1")
    rec = record_of("42", os.getpid())
    records.save(rec)
    assert records.load("42") == rec
    assert oct(os.stat(tmp_path / "jobs" / "n1").st_mode & 0o777) == "0o700"
    assert [p.name for p in (tmp_path / "jobs" / "n1").iterdir()] == ["42.json"]  # no temporary left
    records.remove("42")
    assert records.load("42") is None


def test_bad_job_ids_and_broken_records_are_refused(tmp_path):
    records = JobRecords(tmp_path, "n1")
    assert records.load("../x") is None
    with pytest.raises(ValueError, match="invalid job id"):
        records.status_fd("1/2")
    records.save(record_of("7", os.getpid()))
    (tmp_path / "jobs" / "n1" / "7.json").write_text("{not json")
    assert records.load("7") is None


def test_a_reused_pid_is_not_the_job(tmp_path):
    proc = subprocess.Popen(["sleep", "30"])
    try:
        rec = record_of("5", proc.pid)
        assert job_records.same_process(proc.pid, rec.init_start)
        assert not job_records.same_process(proc.pid, rec.init_start + 1)
    finally:
        proc.kill()
        proc.wait()


def test_an_adopted_tree_ends_with_the_status_mm_init_wrote(tmp_path):
    records = JobRecords(tmp_path, "n1")
    fd = records.status_fd("9")
    # Stands in for mm-init's outer process: not this test's child once adopted, it
    # writes the job's exit code to the status fd when the job ends.
    code = "import os,sys,time; time.sleep(0.5); os.write(int(sys.argv[1]), b'7\\n'); sys.exit(7)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(fd)], pass_fds=(fd,))
    os.close(fd)
    tree = adopt.AdoptedTree.of(record_of("9", proc.pid), records)
    assert tree.poll() is None
    assert tree.wait(10) == 7
    proc.wait()


def test_a_tree_that_ended_while_no_agent_ran_reports_its_status(tmp_path):
    records = JobRecords(tmp_path, "n1")
    proc = subprocess.Popen(["true"])
    rec = record_of("11", proc.pid)
    proc.wait()
    fd = records.status_fd("11")
    os.write(fd, b"0\n")
    os.close(fd)
    tree = adopt.AdoptedTree.of(rec, records)
    assert tree.poll() == 0


def test_a_stopped_process_is_continued_on_adoption():
    proc = subprocess.Popen(["sh", "-c", "kill -STOP $$; exec sleep 30"])
    try:
        for _ in range(250):
            with open(f"/proc/{proc.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "T":
                    break
            time.sleep(0.02)
        assert adopt.continue_stopped(proc.pid) == [proc.pid]
        assert adopt.continue_stopped(proc.pid) == []  # running now
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- reattach requests

@pytest.fixture
def node_agent(tmp_path, monkeypatch):
    import pwd as pwd_mod  # noqa: PLC0415

    from agent_fakes import UID, FakeCheckpointer, FakeSlurm, make_job  # noqa: PLC0415

    from slurm_mm import config  # noqa: PLC0415
    from slurm_mm.agent.node_agent import NodeAgent  # noqa: PLC0415

    cfg = config.from_mapping({"run_dir": str(tmp_path / "run"), "staging_dir": str(tmp_path / "staging")})
    agent = NodeAgent("n1", cfg, FakeSlurm(make_job(1)), FakeCheckpointer(tmp_path))
    # The peer is the job's batch step and Slurm confirms the job: decided elsewhere (auth.py).
    monkeypatch.setattr(adopt.auth, "check_batch_step", lambda pid, job_id, node: None)
    monkeypatch.setattr(adopt.auth, "authorize_batch_step", lambda pid, uid, job_id, node, slurm: slurm.current)
    monkeypatch.setattr(pwd_mod, "getpwuid", lambda uid: pwd_mod.struct_passwd(
        ("mm", "x", uid, uid, "", "/tmp", "/bin/sh")))
    agent.uid = UID
    return agent


def reattach(agent, job_id: str = "77") -> dict:
    from slurm_mm.agent import protocol  # noqa: PLC0415

    conn, peer = socket.socketpair()
    fds = [os.open("/dev/null", os.O_RDWR) for _ in range(3)]
    message = {"op": "reattach", "job_id": job_id, "argv": ["/bin/true"], "env": {}, "cwd": "/tmp"}
    done = threading.Thread(target=adopt.handle_reattach,
                            args=(agent, conn, os.getpid(), agent.uid, message, fds, lambda: None))
    done.start()
    peer.settimeout(10)
    reply = protocol.recv(peer)[0]
    peer.close()
    done.join(10)
    conn.close()
    return reply


def test_a_reattach_without_a_record_or_of_another_run_is_refused(node_agent):
    reply = reattach(node_agent)
    assert reply["op"] == "refused" and "no record on n1" in reply["message"]
    proc = subprocess.Popen(["sleep", "30"])
    try:
        rec = record_of("77", proc.pid)
        rec.uid, rec.epoch = node_agent.uid, 0  # this run is the job's second (restart count 1)
        node_agent.records.save(rec)
        reply = reattach(node_agent)
        assert reply["op"] == "refused" and "another run" in reply["message"]
    finally:
        proc.kill()
        proc.wait()


def test_a_reattached_job_is_taken_over_and_ends_with_its_recorded_status(node_agent):
    proc = subprocess.Popen(["sleep", "30"])
    try:
        rec = record_of("77", proc.pid)
        rec.uid, rec.epoch = node_agent.uid, 1
        node_agent.records.save(rec)
        fd = node_agent.records.status_fd("77")
        os.write(fd, b"5\n")
        os.close(fd)
        conn, peer = socket.socketpair()
        fds = [os.open("/dev/null", os.O_RDWR) for _ in range(3)]
        message = {"op": "reattach", "job_id": "77", "argv": ["/bin/true"], "env": {}, "cwd": "/tmp"}
        threading.Thread(target=adopt.handle_reattach, daemon=True,
                         args=(node_agent, conn, os.getpid(), node_agent.uid, message, fds, lambda: None)).start()
        from slurm_mm.agent import protocol  # noqa: PLC0415

        peer.settimeout(10)
        assert protocol.recv(peer)[0] == {"op": "reattached", "mode": "restored"}
        sup = node_agent.jobs.get("77")
        assert sup is not None and sup.record.last_image == {"name": "ckpt-000003"}
        proc.kill()  # the job's tree ends; mm-init had written its status
        proc.wait()
        assert protocol.recv(peer)[0] == {"op": "exit", "status": 5}
        peer.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("trigger, slurm_requeues, requeued_by_us", [
    ("drain", False, True), ("preempt", False, True), ("preempt", True, False)],
    ids=["drain", "preempt-before-24.05", "preempt-24.05+"])
def test_a_stopping_checkpoint_cut_short_by_the_restart_requeues_the_job(node_agent, monkeypatch, trigger,
                                                                          slurm_requeues, requeued_by_us):
    from slurm_mm.agent import protocol  # noqa: PLC0415

    monkeypatch.setattr(adopt, "slurm_requeues_preempted_job_on_exit", lambda: slurm_requeues)
    proc = subprocess.Popen(["true"])
    rec = record_of("77", proc.pid)
    proc.wait()  # the dump killed the tree; nothing was committed
    rec.uid, rec.epoch, rec.stopping = node_agent.uid, 1, trigger
    node_agent.records.save(rec)
    fd = node_agent.records.status_fd("77")
    os.write(fd, b"137\n")
    os.close(fd)
    conn, peer = socket.socketpair()
    fds = [os.open("/dev/null", os.O_RDWR) for _ in range(3)]
    message = {"op": "reattach", "job_id": "77", "argv": ["/bin/true"], "env": {}, "cwd": "/tmp"}
    threading.Thread(target=adopt.handle_reattach, daemon=True,
                     args=(node_agent, conn, os.getpid(), node_agent.uid, message, fds, lambda: None)).start()
    peer.settimeout(10)
    assert protocol.recv(peer)[0] == {"op": "exit", "status": 143}
    assert node_agent.slurm.requeues == ([("77", False)] if requeued_by_us else [])
    peer.close()


def test_step_processes_have_status_files_of_their_own_and_go_with_the_job(tmp_path):
    records = JobRecords(tmp_path, "n1")
    records.save(record_of("42", os.getpid()))
    for key, code in (("", 0), ("srun-0123456789abcdef", 7), ("step-0123456789abcdef-3", 130)):
        fd = records.status_fd("42", key)
        os.write(fd, f"{code}\n".encode())
        os.close(fd)
        assert records.exit_status("42", key) == code
    with pytest.raises(ValueError, match="invalid status key"):
        records.status_fd("42", "../x")
    assert records.exit_status("42", "../x") is None
    records.remove_status("42", "srun-0123456789abcdef")
    assert records.exit_status("42", "srun-0123456789abcdef") is None
    records.save(record_of("43", os.getpid()))
    assert records.job_ids() == {"42", "43"}
    job_records.forget(records, "42")
    assert sorted(p.name for p in records.dir.iterdir()) == ["43.json"]


def test_a_record_of_steps_survives_and_an_update_never_brings_back_a_forgotten_job(tmp_path):
    records = JobRecords(tmp_path, "n1")
    rec = record_of("8", os.getpid())
    rec.steps = {"0123456789abcdef": {"argv": ["-n1", "app"], "env": {"A": "b"}, "cwd": "/", "standin_ns_pid": 12,
                                      "ntasks": 1, "srun": [os.getpid(), start_time(os.getpid())],
                                      "tasks": {"0": [1, 2, 3, 4]}}}
    records.save(rec)
    assert records.load("8") == rec

    class Sup:  # what job_records.save reads of a supervisor
        job_id, epoch = "8", 2
        req = type("Req", (), {"uid": 1000})()
        record = type("State", (), {"mode": "launched", "last_image": {}})()
        tree = type("Tree", (), {"init_pid": os.getpid(), "waiter_pid": os.getpid()})()
        steps = type("Guard", (), {"jobsteps": type("Steps", (), {"persisted": lambda self: {}})()})()

    records.save(TreeRecord(**{**rec.__dict__, "stopping": "preempt"}))
    job_records.save(records, Sup(), stopping=None)  # a steps update keeps the stopping mark
    assert records.load("8").stopping == "preempt" and records.load("8").steps == {}
    job_records.forget(records, "8")
    job_records.save(records, Sup(), stopping=None)
    assert records.load("8") is None


class _Slurm:
    def __init__(self, jobs, fail=False):
        self._jobs, self.fail = jobs, fail

    def jobs(self, node=None):
        from slurm_mm.errors import SlurmError
        if self.fail:
            raise SlurmError("slurmctld unreachable")
        return self._jobs


def test_the_agent_start_sweeps_records_of_jobs_no_longer_running_here(tmp_path):
    from slurm_mm.agent.record_sweep import sweep
    from slurm_mm.slurm.model import Job
    records = JobRecords(tmp_path, "n1")
    for job_id in ("1", "2", "3"):
        records.save(record_of(job_id, os.getpid()))
    fd = records.status_fd("4", "srun-0123456789abcdef")
    os.close(fd)
    steps_dir = tmp_path / "steps"
    (steps_dir / "5").mkdir(parents=True)
    (steps_dir / "2").mkdir()

    def job(job_id, state):
        return Job(job_id, 1000, 1000, state, "n1", 0, 0, 0, "n1", "low", True, None, "/")

    assert sweep(records, _Slurm([], fail=True), "n1", steps_dir) == []  # no answer: nothing goes
    assert records.job_ids() == {"1", "2", "3", "4"}
    gone = sweep(records, _Slurm([job("2", "RUNNING"), job("3", "COMPLETED")]), "n1", steps_dir)
    assert gone == ["1", "3", "4", "5"]
    assert records.job_ids() == {"2"} and sorted(p.name for p in steps_dir.iterdir()) == ["2"]


def test_a_restarted_agent_takes_over_an_srun_step_its_task_and_srun_s_exit(node_agent):
    from slurm_mm.agent import protocol, step_adopt  # noqa: PLC0415
    from slurm_mm.agent.step_launch import TOKEN_ENV  # noqa: PLC0415

    token, records = "0123456789abcdef", node_agent.records
    batch, keeper, task = (subprocess.Popen(["sleep", "30"]) for _ in range(3))
    try:
        rec = record_of("77", batch.pid)
        rec.uid, rec.epoch = node_agent.uid, 1
        rec.steps = {token: {"argv": ["-n1", "app"], "env": {}, "cwd": "/tmp", "standin_ns_pid": 9, "ntasks": 1,
                             "srun": [keeper.pid, start_time(keeper.pid)],
                             "tasks": {"0": [task.pid, start_time(task.pid), task.pid, start_time(task.pid)]}}}
        records.save(rec)
        for key, code in (("", b"0\n"), (f"step-{token}-0", b"3\n"), (f"srun-{token}", b"3\n")):
            fd = records.status_fd("77", key)
            os.write(fd, code)
            os.close(fd)
        # The task reconnects first: it waits for its batch task to be taken over.
        tconn, tpeer = socket.socketpair()
        tfds = [os.open("/dev/null", os.O_RDWR) for _ in range(3)]
        tmsg = {"op": "reattach", "job_id": "77", "argv": ["app"], "env": {TOKEN_ENV: token, "SLURM_PROCID": "0"},
                "cwd": "/tmp"}
        threading.Thread(target=step_adopt.handle_task_reattach, daemon=True,
                         args=(node_agent.services, tconn, os.getpid(), node_agent.uid, "77", tmsg, tfds,
                               lambda: None)).start()
        conn, peer = socket.socketpair()
        fds = [os.open("/dev/null", os.O_RDWR) for _ in range(3)]
        message = {"op": "reattach", "job_id": "77", "argv": ["/bin/true"], "env": {}, "cwd": "/tmp"}
        threading.Thread(target=adopt.handle_reattach, daemon=True,
                         args=(node_agent, conn, os.getpid(), node_agent.uid, message, fds, lambda: None)).start()
        peer.settimeout(10)
        tpeer.settimeout(10)
        assert protocol.recv(peer)[0]["op"] == "reattached"
        assert protocol.recv(tpeer)[0] == {"op": "reattached", "mode": "reattached"}
        sup = node_agent.jobs.get("77")
        assert list(sup.steps.jobsteps.steps) == [token] and sup.steps.jobsteps.unsettled() is None
        task.kill()
        task.wait()
        assert protocol.recv(tpeer)[0] == {"op": "exit", "status": 3}  # the task's recorded end
        keeper.kill()
        keeper.wait()
        exit_file = node_agent.config.run_dir / "steps" / "77" / token
        keeper_deadline = time.monotonic() + 10
        while not exit_file.exists() and time.monotonic() < keeper_deadline:
            time.sleep(0.05)
        assert exit_file.read_text() == "3\n"  # srun's recorded code reaches the stand-in
        assert records.load("77").steps == {}
        assert sorted(p.name for p in records.dir.iterdir()) == ["77.json", "77.status"]
        batch.kill()
        batch.wait()
        assert protocol.recv(peer)[0] == {"op": "exit", "status": 0}
        deadline = time.monotonic() + 10
        while records.job_ids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert records.job_ids() == set()  # the job is over: its records are gone
    finally:
        for proc in (batch, keeper, task):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_sigterm_stops_the_agent_at_once_even_with_a_commit_s_threads_at_work():
    # A commit runs non-daemon threads: a plain sys.exit would wait for them (and for the
    # next checkpoint's) until systemd's SIGKILL, checkpointing on meanwhile.
    code = ("import os, signal, threading, time\n"
            "from slurm_mm.agent.__main__ import _stop_now\n"
            "signal.signal(signal.SIGTERM, _stop_now)\n"
            "threading.Thread(target=time.sleep, args=(60,)).start()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(60)\n")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], timeout=30, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0 and time.monotonic() - started < 10
