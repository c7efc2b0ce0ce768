"""When the agent treats a job's failed exit as a preemption (and requeues it): only for a
preemption of this very run that the agent itself was told of. A stale record, a record
of another run or an owner's `scontrol requeue` must leave the exit to the job: a wrong
"yes" requeues a job nobody preempted, and a rerun that fails the same way again.

The real supervisor and step guard; fakes only at the checkpointer and Slurm."""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import replace

import pytest
from agent_fakes import GID, UID, FakeCheckpointer, FakeSlurm, make_job

from slurm_mm import config
from slurm_mm.agent import protocol
from slurm_mm.agent import steps as steps_mod
from slurm_mm.agent.job_record import JobState, LaunchRequest
from slurm_mm.agent import preemption as preemption_mod
from slurm_mm.agent.preemption import Preemption, selected_in_run
from slurm_mm.agent.services import JobRegistry, NodeServices
from slurm_mm.agent.supervisor import JobSupervisor
from slurm_mm.errors import SlurmError

POLL = 0.2
RUN = make_job(2, preempt_time=1030, start_time=1000)


@pytest.mark.parametrize("change, epoch, expected", [
    ({}, 2, True),
    ({"preempt_time": 1000}, 2, True),                      # selected in its first second
    ({"preempt_time": 0}, 2, False),                        # never selected
    ({"preempt_time": 995}, 2, False),                      # selected before this run started
    ({}, 1, False),                                         # the record is of a later run
    ({"restart_count": 1}, 2, False),                       # ... or of an earlier one
    ({"state": "PENDING"}, 2, False),                       # requeued already
    ({"state": "COMPLETING"}, 2, False),
    ({"start_time": 0, "preempt_time": 5}, 2, False),       # no start time to compare with
])
def test_only_a_selection_of_this_run_counts(change, epoch, expected):
    assert selected_in_run(replace(RUN, **change), epoch) is expected


class _BusySlurm(FakeSlurm):
    """slurmctld that times out `busy` times before it answers."""

    def __init__(self, job, busy: int) -> None:
        super().__init__(job)
        self.busy, self.asked = busy, 0

    def job(self, job_id):
        self.asked += 1
        if self.asked <= self.busy:
            raise SlurmError("Socket timed out on send/recv operation")
        return super().job(job_id)


@pytest.mark.parametrize("busy, expected", [(0, True), (2, True), (3, False)])
def test_a_busy_slurmctld_is_asked_again_before_a_notice_is_taken_for_a_plain_signal(monkeypatch, busy, expected):
    """Taken for a plain signal, a preemption notice ends the job without its image."""
    monkeypatch.setattr(preemption_mod, "ASK_PAUSE", 0.01)
    slurm = _BusySlurm(RUN, busy)
    assert Preemption(slurm).job_ends_run("77", 2) is expected
    assert slurm.asked == min(busy + 1, preemption_mod.ASK_TRIES)


class Harness:
    """A real JobSupervisor of run 2 of job 77, its tree a fake the test ends."""

    def __init__(self, tmp, record) -> None:
        cfg = config.from_mapping({"run_dir": str(tmp / "run"), "staging_dir": str(tmp / "staging")})
        self.checkpointer = FakeCheckpointer(tmp)
        self.slurm = FakeSlurm(make_job(2))
        services = NodeServices("n1", cfg, self.slurm, self.checkpointer, Preemption(self.slurm), JobRegistry(),
                                poll_interval=POLL)
        self.conn, self.peer = socket.socketpair()
        self.peer.settimeout(8)
        self.stderr_r, stderr_w = os.pipe()
        os.set_blocking(self.stderr_r, False)
        req = LaunchRequest(job=self.slurm.current, uid=UID, gid=GID, groups=[GID], argv=["/bin/true"], env={},
                            cwd="/tmp", stdio=[stderr_w, stderr_w, stderr_w], cgroup_procs=[], interval=0)
        self.sup = JobSupervisor(services, req, self.conn)
        self.sup.start()  # no images: launched
        self.slurm.current = record

    def end_tree(self, status: int) -> dict:
        """The script ends with `status`: what the batch task is told."""
        self.checkpointer.trees[0].end(status)
        return protocol.recv(self.peer, max_size=protocol.MAX_SMALL_MESSAGE)[0]

    def told(self) -> str:
        try:
            return os.read(self.stderr_r, 65536).decode()
        except BlockingIOError:
            return ""


@pytest.fixture
def harness(tmp_path, monkeypatch):
    # Slurm before 24.05 (the agent requeues); the machine's own Slurm must not decide.
    monkeypatch.setattr(steps_mod, "slurm_requeues_preempted_job_on_exit", lambda: False)
    made: list[Harness] = []

    def make(record) -> Harness:
        made.append(Harness(tmp_path, record))
        return made[-1]

    yield make
    for h in made:
        h.conn.close()
        h.peer.close()


def _requeued(h: Harness) -> bool:
    deadline = time.monotonic() + 3
    while not h.slurm.requeues and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(h.slurm.requeues)


def test_script_failing_while_this_run_is_preempted_and_noticed_is_requeued(harness):
    h = harness(RUN)
    h.sup.preempt_notice.saw("USR1 to the batch task")
    h.checkpointer.trees[0].end(143)
    assert _requeued(h) and h.sup.record.state == JobState.REQUEUED
    assert "exit code 143 while this run was being preempted (USR1 to the batch task" in h.told()


def test_from_slurm_24_05_on_the_failing_script_is_left_to_slurm_s_own_requeue(harness, monkeypatch):
    # 24.05+ requeues a job whose script ends in its grace time; a requeue of ours would
    # leave the preemption mark set and requeue the next run once more (docs/slurm-versions.md).
    monkeypatch.setattr(steps_mod, "slurm_requeues_preempted_job_on_exit", lambda: True)
    h = harness(RUN)
    h.sup.preempt_notice.saw("USR1 to the batch task")
    assert h.end_tree(143) == {"op": "exit", "status": steps_mod.REQUEUED_EXIT}
    assert h.sup.record.state == JobState.REQUEUED and h.slurm.requeues == []
    assert "Slurm requeues the job to rerun from the beginning" in h.told()


def test_a_notice_arriving_just_after_the_exit_still_counts(harness):
    # Slurm ends the steps at grace start; the script's exit can beat the relayed signal.
    h = harness(RUN)
    h.checkpointer.trees[0].end(143)
    time.sleep(0.1)
    h.sup.on_signal(signal.SIGUSR1)  # the relayed notice, late
    assert _requeued(h) and h.sup.record.state == JobState.REQUEUED


def test_exit_without_a_notice_in_this_run_is_the_job_s_own(harness):
    h = harness(RUN)  # slurmctld's record says preempted; no notice ever reached the agent
    started = time.monotonic()
    assert h.end_tree(143) == {"op": "exit", "status": 143}
    assert time.monotonic() - started < POLL + 1.5 + 1  # a bounded wait for a late notice
    assert h.slurm.requeues == [] and h.sup.record.state == JobState.EXITED


@pytest.mark.parametrize("record", [
    replace(RUN, preempt_time=990),       # a selection before this run started (stale)
    replace(RUN, restart_count=3),        # the record is of another run
    replace(RUN, state="PENDING"),        # the owner's `scontrol requeue` took it
], ids=["stale-preempt-time", "other-run", "owner-requeue"])
def test_stale_or_foreign_preemption_never_requeues_even_with_a_notice(harness, record):
    h = harness(record)
    h.sup.preempt_notice.saw("TERM to the batch task")
    assert h.end_tree(143) == {"op": "exit", "status": 143}
    assert h.slurm.requeues == [] and "preempted" not in h.told()


def test_a_term_to_a_run_preempted_before_is_passed_on_and_no_notice(harness):
    # The owner's `scontrol requeue` sends TERM; a stale record must not turn it into an image.
    h = harness(replace(RUN, restart_count=1))
    h.sup.on_signal(signal.SIGTERM)
    assert h.checkpointer.trees[0].signals == [signal.SIGTERM]
    assert not h.sup.preempt_notice.seen() and not [c for c in h.checkpointer.calls if c[0] == "dump"]


def test_success_is_never_reinterpreted(harness):
    h = harness(RUN)
    h.sup.preempt_notice.saw("USR1 to the batch task")
    assert h.end_tree(0) == {"op": "exit", "status": 0}
    assert h.slurm.requeues == []


def test_on_slurm_24_05_and_later_slurm_requeues_the_preempted_script_itself(harness, monkeypatch):
    """24.05+ marks a job preempted in its grace time and clears the mark only when it
    requeues the job itself: our own `scontrol requeue` would requeue the next run again."""
    monkeypatch.setattr(steps_mod, "slurm_requeues_preempted_job_on_exit", lambda: True)
    h = harness(RUN)
    h.sup.preempt_notice.saw("USR1 to the batch task")
    assert h.end_tree(143) == {"op": "exit", "status": 143}
    assert h.sup.record.state == JobState.REQUEUED and "Slurm requeues the job to rerun" in h.told()
    time.sleep(0.2)  # an observation window: no requeue of ours may follow
    assert h.slurm.requeues == []
