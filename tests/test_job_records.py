"""Job records of a node agent and taking over a tree it did not start (no Slurm, no CRIU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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
