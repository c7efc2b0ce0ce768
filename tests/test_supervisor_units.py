"""The job supervisor's decisions, in milliseconds: fakes stand only at its true
boundaries (the checkpointer = CRIU + store, Slurm, and the batch task's socket).

What is decided here and nowhere else: which image a requeued run restores and what it
does when none restores (the restore policy); what a preemption notice, a SUSPEND and
any other signal do; that a stopping checkpoint requeues the job and ends the batch
task with 143, never 0; that a failed commit never loses the job and never runs two
copies of it; that a completed job says so and a failed checkpoint leaves it running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from agent_fakes import GID, UID, FakeCheckpointer, FakeSlurm, fake_image, make_job

from slurm_mm import config
from slurm_mm.agent import protocol, steps as steps_mod, supervisor as supervisor_mod
from slurm_mm.agent.job_record import JobState, LaunchRequest
from slurm_mm.agent.preemption import Preemption
from slurm_mm.agent.services import JobRegistry, NodeServices
from slurm_mm.agent.supervisor import REQUEUED_EXIT, JobSupervisor
from slurm_mm.errors import CheckpointFailed, RestoreRefusedByPolicy, StoreBusy
from slurm_mm.store import Trigger

class Harness:
    def __init__(self, tmp: Path, *, restart_count: int = 0, images=None, env=None, policy="rerun") -> None:
        self.cfg = config.from_mapping({"run_dir": str(tmp / "run"), "staging_dir": str(tmp / "staging"),
                                        "restore_policy": policy})
        self.checkpointer = FakeCheckpointer(tmp, images)
        self.slurm = FakeSlurm(make_job(restart_count))
        self.jobs: JobRegistry = JobRegistry()
        services = NodeServices("n1", self.cfg, self.slurm, self.checkpointer, Preemption(self.slurm), self.jobs)
        self.conn, self.peer = socket.socketpair()
        self.peer.settimeout(5)
        self.stderr_r, stderr_w = os.pipe()
        os.set_blocking(self.stderr_r, False)
        req = LaunchRequest(job=self.slurm.current, uid=UID, gid=GID, groups=[GID], argv=["/bin/true"],
                            env=dict(env or {}), cwd="/tmp", stdio=[stderr_w, stderr_w, stderr_w],
                            cgroup_procs=[], interval=0)
        self.sup = JobSupervisor(services, req, self.conn)
        self.jobs.add_unless("77", self.sup, lambda s: False)
        self._told = b""

    def told(self) -> str:
        try:
            self._told += os.read(self.stderr_r, 65536)
        except BlockingIOError:
            pass
        return self._told.decode()

    def message(self) -> dict:
        return protocol.recv(self.peer, max_size=protocol.MAX_SMALL_MESSAGE)[0]


@pytest.fixture
def harness(tmp_path):
    made: list[Harness] = []

    def make(**kw) -> Harness:
        h = Harness(tmp_path, **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        for tree in h.checkpointer.trees:
            tree.end(0) if not tree.ended.is_set() else None
        h.conn.close()
        h.peer.close()


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


# ---------------------------------------------------------------- start and restore

def test_first_run_launches_and_a_clean_exit_is_reported_and_marked_completed(harness):
    h = harness()
    assert h.sup.start() == "launched" and h.sup.record.state == JobState.RUNNING
    h.checkpointer.trees[0].end(0)
    assert h.message() == {"op": "exit", "status": 0}
    assert (h.cfg.run_dir / "completed" / "77").read_text() == "0\n"
    wait_for(lambda: "77" not in h.jobs)


def test_a_failing_script_is_reported_with_its_code_and_not_marked_completed(harness):
    h = harness()
    h.sup.start()
    h.checkpointer.trees[0].end(3)
    assert h.message() == {"op": "exit", "status": 3}
    assert not (h.cfg.run_dir / "completed" / "77").exists()


def test_requeued_run_restores_the_newest_image_that_restores(harness):
    images = [fake_image(3, epoch=1), fake_image(2, epoch=0), fake_image(1, epoch=0)]
    h = harness(restart_count=1, images=images)
    h.checkpointer.bad_images = {2}
    assert h.sup.start() == "restored"
    assert [c for c in h.checkpointer.calls if c[0] == "restore_image"] == [("restore_image", 2),
                                                                           ("restore_image", 1)]
    told = h.told()
    assert "not restoring ckpt-000003: not older" in told  # this run's own image: never
    assert "cannot restore ckpt-000002: ckpt-000002: chunk 3 does not match" in told
    assert "restored from ckpt-000001" in told
    assert "the run after that image was lost" in told, "a periodic image: the run went on past it"
    assert ("launch",) not in h.checkpointer.calls


def test_a_run_that_ended_with_its_preemption_image_is_not_called_lost(harness):
    h = harness(restart_count=1, images=[fake_image(1, trigger="preempt")])
    assert h.sup.start() == "restored"
    told = h.told()
    assert "restored from ckpt-000001" in told and "was lost" not in told


def test_another_owners_image_is_never_restored(harness):
    h = harness(restart_count=1, images=[fake_image(1, uid=0, gid=0)])
    assert h.sup.start() == "launched"
    assert not [c for c in h.checkpointer.calls if c[0] == "restore_image"]
    assert "not restoring ckpt-000001: not the owner's" in h.told()


@pytest.mark.parametrize("policy, source", [("fail", "site"), ("fail", "job")])
def test_restore_policy_fail_refuses_to_rerun_over_the_jobs_output(harness, policy, source):
    env = {"SLURM_MM_RESTORE_POLICY": policy} if source == "job" else {}
    h = harness(restart_count=1, images=[fake_image(1)], env=env, policy=policy if source == "site" else "rerun")
    h.checkpointer.bad_images = {1}
    with pytest.raises(RestoreRefusedByPolicy, match=r"none of its images can be restored \(ckpt-000001\)"):
        h.sup.start()
    assert ("launch",) not in h.checkpointer.calls


def test_restore_policy_hold_requeues_held_once_then_reruns_after_release(harness):
    h = harness(restart_count=1, images=[fake_image(1)], policy="hold")
    h.checkpointer.bad_images = {1}
    assert h.sup.start() == "held"
    assert h.slurm.requeues == [("77", True)] and h.sup.record.state == JobState.REQUEUED
    again = harness(restart_count=2, images=[fake_image(1)], policy="hold")  # after `scontrol release`
    again.checkpointer.bad_images = {1}
    assert again.sup.start() == "launched"


def test_restore_policy_rerun_starts_the_script_from_the_beginning(harness):
    h = harness(restart_count=1, images=[fake_image(1)])
    h.checkpointer.bad_images = {1}
    assert h.sup.start() == "launched"
    assert "starting the job script from the beginning" in h.told()


# ---------------------------------------------------------------- signals

def test_preemption_notice_takes_a_stopping_image_and_requeues_with_143(harness, monkeypatch):
    monkeypatch.setattr(supervisor_mod, "slurm_requeues_preempted_job_on_exit", lambda: False)  # Slurm < 24.05
    h = harness()
    h.sup.start()
    h.slurm.current = make_job(preempt_time=2000, start_time=1000)
    h.sup.on_signal(signal.SIGTERM)
    assert h.message() == {"op": "exit", "status": REQUEUED_EXIT}
    assert ("dump", False) in h.checkpointer.calls and ("commit", "preempt") in h.checkpointer.calls
    assert h.slurm.requeues == [("77", False)] and h.sup.record.state == JobState.REQUEUED
    assert h.checkpointer.trees[0].signals == [], "the job's own handler never saw the notice"


def test_on_slurm_24_05_a_preempted_run_just_ends_and_slurm_requeues_it(harness, monkeypatch):
    # Our own requeue would leave Slurm's grace-time mark on the job and the next run
    # would be requeued once more when it completes.
    monkeypatch.setattr(supervisor_mod, "slurm_requeues_preempted_job_on_exit", lambda: True)
    h = harness()
    h.sup.start()
    h.slurm.current = make_job(preempt_time=2000, start_time=1000)
    h.sup.on_signal(signal.SIGTERM)
    assert h.message() == {"op": "exit", "status": REQUEUED_EXIT}
    assert ("commit", "preempt") in h.checkpointer.calls
    assert h.slurm.requeues == [] and h.sup.record.state == JobState.REQUEUED
    assert "Slurm requeues it" in h.told()


@pytest.mark.parametrize("preempt_time, partition", [(0, "low"), (500, "low"), (2000, "gang")],
                         ids=["not-preempted", "preempted-in-an-earlier-run", "suspend-partition"])
def test_a_term_that_is_no_ending_preemption_is_the_jobs_own(harness, preempt_time, partition):
    h = harness()
    h.sup.start()
    h.slurm.current = make_job(preempt_time=preempt_time, start_time=1000, partition=partition)
    h.sup.on_signal(signal.SIGTERM)
    assert h.checkpointer.trees[0].signals == [signal.SIGTERM]
    assert not [c for c in h.checkpointer.calls if c[0] == "dump"] and h.slurm.requeues == []


def test_suspend_moves_gpu_state_out_and_back_and_no_image_is_taken_meanwhile(harness):
    h = harness()
    h.sup.start()
    h.sup.on_signal(signal.SIGTSTP)
    assert h.sup.checkpoint(Trigger.PERIODIC) is None and "suspended" in h.sup.record.last_error
    h.sup.on_signal(signal.SIGCONT)
    assert ("suspend_gpu",) in h.checkpointer.calls and ("resume_gpu", [h.checkpointer.trees[0].init_pid]) in h.checkpointer.calls
    assert h.checkpointer.trees[0].signals == [signal.SIGCONT]
    assert h.sup.checkpoint(Trigger.PERIODIC) is not None


def test_only_a_periodic_commit_is_placed_on_spare_cpus(harness):
    h = harness()
    h.sup.start()
    assert h.sup.checkpoint(Trigger.PERIODIC) is not None
    assert h.sup.checkpoint(Trigger.MANUAL) is not None
    cpus = h.checkpointer.commit_cpus
    assert len(cpus) == 2 and cpus[0] and cpus[0] <= os.sched_getaffinity(0) and cpus[1] is None


# ---------------------------------------------------------------- checkpoints that fail

def test_a_failed_dump_leaves_the_job_running(harness):
    h = harness()
    h.sup.start()
    h.checkpointer.fail["dump"] = CheckpointFailed("criu dump: page-pipe split failed")
    assert h.sup.checkpoint(Trigger.PERIODIC) is None
    assert h.sup.record.state == JobState.RUNNING and not h.checkpointer.trees[0].ended.is_set()
    assert "periodic checkpoint failed: criu dump: page-pipe split failed; the job keeps running" in h.told()


def test_a_refused_commit_of_a_stopping_image_resumes_the_job_here(harness):
    h = harness()
    h.sup.start()
    h.checkpointer.fail["commit"] = StoreBusy("store full")
    assert h.sup.checkpoint(Trigger.DRAIN) is None
    assert any(c[0] == "restore" for c in h.checkpointer.calls)
    assert "could not store the image (store full); the job resumed on this node" in h.told()
    assert h.slurm.requeues == [] and h.sup.tree.name == "restored-in-place"
    h.sup.tree.end(0)
    assert h.message() == {"op": "exit", "status": 0}


def test_no_restore_in_place_while_the_dumped_tree_still_lives(harness, monkeypatch):
    """Two copies of one job never run: if the dumped tree does not go, the job is requeued
    to resume from its last stored image instead."""
    monkeypatch.setattr(supervisor_mod, "OLD_TREE_GONE_SECONDS", 0.05)
    h = harness()
    h.sup.start()
    h.checkpointer.fail["commit"] = StoreBusy("store full")
    original_dump = h.checkpointer.dump
    h.checkpointer.dump = lambda pid, staging, *, leave_running, files=None, deadline=None: original_dump(
        pid, staging, leave_running=True, files=files)  # a dump that did not end the tree
    assert h.sup.checkpoint(Trigger.DRAIN) is None
    assert not any(c[0] == "restore" for c in h.checkpointer.calls)
    assert "the dumped tree is still there after 0 s" in h.told()
    wait_for(lambda: h.slurm.requeues == [("77", False)])


def test_checkpoints_of_one_job_are_serialised(harness):
    h = harness()
    h.sup.start()
    inside = threading.Event()
    release = threading.Event()
    order: list[str] = []
    original = h.checkpointer.dump

    def slow_dump(pid, staging, *, leave_running, files=None, deadline=None):
        order.append("start")
        inside.set()
        release.wait(5)
        order.append("end")
        return original(pid, staging, leave_running=leave_running, files=files)

    h.checkpointer.dump = slow_dump
    first = threading.Thread(target=h.sup.checkpoint, args=(Trigger.PERIODIC,))
    first.start()
    assert inside.wait(5)
    second = threading.Thread(target=h.sup.checkpoint, args=(Trigger.MANUAL,))
    second.start()
    time.sleep(0.05)
    assert order == ["start"], "the second checkpoint waits for the first"
    release.set()
    first.join(5)
    second.join(5)
    assert order == ["start", "end", "start", "end"]


# ---------------------------------------------------------------- srun steps: dump order

class FakeJobSteps:
    """One running step whose real `srun` is `srun_argv` (a real process: its exit is waited on)."""

    def __init__(self, order: list, srun_argv: list[str]) -> None:
        self.order, self.stopping, self.dumped_tasks, self.held = order, False, 0, []
        self.procs = [subprocess.Popen(srun_argv)]

    def active(self) -> bool:
        return True

    def unsettled(self) -> None:
        return None

    def sruns(self) -> list:
        return self.procs

    def task_output_fds(self) -> list[int]:
        return []

    def task_pids(self) -> list[int]:
        return []

    def dump(self, staging, leave_running=False, leave_stopped=False) -> dict:
        self.order.append(("steps", "left stopped" if leave_stopped else "ended"))
        self.dumped_tasks = 1
        return {"0123456789abcdef": {"ranks": [0]}}

    def resume(self) -> None:
        self.order.append("resume")

    def unpack(self, staging, meta) -> None:
        self.order.append("unpack")

    def discard_unpacked(self) -> None:
        pass

    def restored(self, tree, meta) -> None:
        self.order.append(("restored", self.stopping))

    def cleanup(self) -> None:
        pass


def with_step(h: Harness, srun_argv: list[str]) -> list:
    order: list = []
    h.sup.steps.jobsteps = FakeJobSteps(order, srun_argv)
    original = h.checkpointer.dump

    def dump(pid, staging, *, leave_running, files=None, deadline=None, leave_stopped=False):
        order.append(("batch", "left running" if leave_running else "ended"))
        return original(pid, staging, leave_running=leave_running, files=files)

    h.checkpointer.dump = dump
    return order


def test_a_stopping_image_dumps_the_step_tasks_first_and_the_batch_tree_once_srun_has_exited(harness):
    h = harness()
    h.sup.start()
    order = with_step(h, ["true"])
    image = h.sup.checkpoint(Trigger.DRAIN)
    assert image is not None and order == [("steps", "ended"), ("batch", "ended")]
    assert h.sup.steps.jobsteps.procs[0].poll() == 0  # srun had exited before the batch dump
    assert h.checkpointer.calls[-1] == ("commit", "drain")
    wait_for(lambda: h.slurm.requeues == [("77", False)])


def test_a_stopping_image_whose_srun_does_not_exit_requeues_instead_of_writing_a_torn_image(harness, monkeypatch):
    monkeypatch.setattr(steps_mod, "DRAIN_SECONDS", 0.2)
    h = harness()
    h.sup.start()
    order = with_step(h, ["sleep", "30"])
    assert h.sup.checkpoint(Trigger.DRAIN) is None
    assert order == [("steps", "ended")]  # no batch image without the step's last output
    assert h.sup.steps.jobsteps.procs[0].wait(5) == -signal.SIGKILL
    assert "did not exit within 0.2 s" in h.told() and "requeueing the job to rerun from" in h.told()
    assert h.sup.record.state == JobState.REQUEUED
    wait_for(lambda: h.slurm.requeues == [("77", False)])


def test_a_periodic_image_keeps_the_step_tasks_stopped_across_the_batch_tree_s_dump(harness):
    h = harness()
    h.sup.start()
    order = with_step(h, ["sleep", "30"])
    try:
        assert h.sup.checkpoint(Trigger.PERIODIC) is not None
    finally:
        h.sup.steps.jobsteps.procs[0].kill()
    assert order == [("steps", "left stopped"), ("batch", "left running"), "resume"]
    assert h.sup.record.state == JobState.RUNNING


def test_a_refused_commit_after_a_stopping_image_resumes_the_steps_here_too(harness):
    h = harness()
    h.sup.start()
    order = with_step(h, ["true"])
    h.checkpointer.fail["commit"] = StoreBusy("store full")
    assert h.sup.checkpoint(Trigger.DRAIN) is None
    assert order == [("steps", "ended"), ("batch", "ended"), "unpack", ("restored", False)]
    assert "could not store the image (store full); the job resumed on this node" in h.told()
    assert h.slurm.requeues == [] and h.sup.tree.name == "restored-in-place"
