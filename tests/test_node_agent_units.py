"""The node agent's decisions without Slurm or CRIU: who may ask for a checkpoint, and
which running jobs a look at Slurm turns into preempt or drain images. Fakes stand at
the checkpointer and Slurm boundaries (tests/agent_fakes.py)."""

from __future__ import annotations

import socket
import time

import pytest
from agent_fakes import GID, UID, FakeCheckpointer, FakeSlurm, make_job

from slurm_mm import config
from slurm_mm.agent.job_record import LaunchRequest
from slurm_mm.agent.node_agent import DRAIN_PREFIX, NodeAgent
from slurm_mm.agent.supervisor import JobSupervisor
from slurm_mm.errors import NotEnrolled, PermissionDenied
from slurm_mm.slurm.model import Node
from slurm_mm.store import Trigger


class Node1Slurm(FakeSlurm):
    def __init__(self, job) -> None:
        super().__init__(job)
        self.node_state = Node("n1", "allocated", (), "")

    def node(self, name):
        return self.node_state


@pytest.fixture
def agent(tmp_path):
    cfg = config.from_mapping({"run_dir": str(tmp_path / "run"), "staging_dir": str(tmp_path / "staging"),
                               "min_interval": 60})
    checkpointer = FakeCheckpointer(tmp_path)
    node_agent = NodeAgent("n1", cfg, Node1Slurm(make_job()), checkpointer)
    socks = []

    def supervise(job=None) -> JobSupervisor:
        job = job or make_job()
        conn, peer = socket.socketpair()
        socks.extend([conn, peer])
        req = LaunchRequest(job=job, uid=UID, gid=GID, groups=[GID], argv=["/bin/true"], env={}, cwd="/tmp",
                            stdio=[peer.fileno()] * 3, cgroup_procs=[], interval=0)
        sup = JobSupervisor(node_agent.services, req, conn)
        node_agent.jobs.add_unless(job.job_id, sup, lambda s: False)
        sup.start()
        return sup

    node_agent.supervise = supervise
    yield node_agent
    for tree in checkpointer.trees:
        if not tree.ended.is_set():
            tree.end(0)
    for s in socks:
        s.close()


def _wait(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


# ---------------------------------------------------------------- checkpoint requests

def test_checkpoint_requests_are_the_owners_or_roots_and_of_enrolled_jobs_only(agent):
    agent.supervise()
    with pytest.raises(PermissionDenied, match="invalid job id '77; rm'"):
        agent._checkpoint_request(UID, {"job_id": "77; rm"})
    with pytest.raises(NotEnrolled, match="job 78 is not running under slurm_mm on n1"):
        agent._checkpoint_request(UID, {"job_id": "78"})
    with pytest.raises(PermissionDenied):
        agent._checkpoint_request(UID + 1, {"job_id": "77"})
    reply, then = agent._checkpoint_request(UID, {"job_id": "77"})
    assert reply == {"op": "checkpointed", "image": "ckpt-000001", "trigger": "manual", "requeued": False}
    assert then is None and ("hurry",) in agent.checkpointer.calls


def test_a_users_manual_checkpoints_are_rate_limited_roots_are_not(agent):
    agent.supervise()
    agent._checkpoint_request(UID, {"job_id": "77"})
    with pytest.raises(PermissionDenied, match=r"one manual checkpoint per 60 s \(min_interval\)"):
        agent._checkpoint_request(UID, {"job_id": "77"})
    reply, _ = agent._checkpoint_request(0, {"job_id": "77"})
    assert reply["image"] == "ckpt-000002"


def test_only_root_drains_and_a_drain_requeues_after_the_reply(agent):
    sup = agent.supervise()
    with pytest.raises(PermissionDenied, match="trigger 'drain' is not allowed"):
        agent._checkpoint_request(UID, {"job_id": "77", "trigger": "drain"})
    with pytest.raises(PermissionDenied, match="trigger 'periodic' is not allowed"):
        agent._checkpoint_request(0, {"job_id": "77", "trigger": "periodic"})
    reply, then = agent._checkpoint_request(0, {"job_id": "77", "trigger": "drain"})
    assert reply["requeued"] is True and agent.slurm.requeues == [], "the requeue waits for the reply"
    then()
    assert agent.slurm.requeues == [("77", False)] and sup.record.state == "requeued"


# ---------------------------------------------------------------- the watcher

def test_a_preempted_job_gets_its_preempt_image_from_the_watcher(agent):
    sup = agent.supervise()
    agent.slurm.current = make_job(preempt_time=2000, start_time=1000)
    assert agent.poll_once() == {"77": Trigger.PREEMPT}
    _wait(lambda: sup.record.state == "requeued")
    assert ("commit", "preempt") in agent.checkpointer.calls


def test_only_a_slurm_mm_drain_of_this_node_starts_drain_images(agent):
    agent.supervise()
    agent.slurm.node_state = Node("n1", "mixed", ("DRAIN",), "admin: bad DIMM")
    assert agent.poll_once() == {}, "someone else's drain leaves the job to Slurm"
    agent.slurm.node_state = Node("n1", "mixed", ("DRAIN",), f"{DRAIN_PREFIX} maintenance")
    assert agent.poll_once() == {"77": Trigger.DRAIN}
    _wait(lambda: agent.slurm.requeues == [("77", False)])
    assert ("commit", "drain") in agent.checkpointer.calls


def test_the_watcher_leaves_alone_suspended_and_earlier_runs_preempted_jobs(agent):
    sup = agent.supervise()
    agent.slurm.current = make_job(preempt_time=500, start_time=1000)  # preempted in an earlier run
    assert agent.poll_once() == {}
    agent.slurm.current = make_job(preempt_time=2000, start_time=1000)
    sup.suspended.set()
    assert agent.poll_once() == {}
    assert not [c for c in agent.checkpointer.calls if c[0] == "dump"]


def test_status_shows_a_user_only_their_jobs(agent):
    agent.supervise()
    assert [r["job_id"] for r in agent.status(UID)] == ["77"] == [r["job_id"] for r in agent.status(0)]
    assert agent.status(UID + 1) == []
