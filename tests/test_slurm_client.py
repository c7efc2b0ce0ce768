"""The Slurm client reads both JSON shapes, and works against the real cluster."""

from __future__ import annotations

import os

import pytest

from conftest import testcluster as tc
from slurm_mm.errors import SlurmError
from slurm_mm.slurm.client import CommandClient, job_from_json, node_from_json

JOB_2205 = {"job_id": 7, "user_id": 1001, "group_id": 1001, "job_state": "RUNNING", "batch_host": "n2",
            "restart_cnt": 1, "preempt_time": 0, "start_time": 1700000000, "nodes": "n2",
            "partition": "low", "requeue": True, "exit_code": 0, "current_working_directory": "/home/u"}
JOB_2411 = {"job_id": 7, "user_id": 1001, "group_id": 1001, "job_state": ["RUNNING"], "batch_host": "n2",
            "restart_cnt": 1, "preempt_time": {"set": True, "infinite": False, "number": 1700000050},
            "start_time": {"set": True, "infinite": False, "number": 1700000000}, "nodes": "n2",
            "partition": "low", "requeue": True,
            "exit_code": {"status": ["SUCCESS"], "return_code": {"set": True, "infinite": False, "number": 0}},
            "current_working_directory": "/home/u"}


def test_reads_2205_and_2411_job_shapes():
    old, new = job_from_json(JOB_2205), job_from_json(JOB_2411)
    assert old.state == new.state == "RUNNING"
    assert old.restart_count == new.restart_count == 1
    assert old.start_time == new.start_time == 1700000000
    assert old.preempt_time == 0 and new.preempt_time == 1700000050
    assert old.exit_code == new.exit_code == 0


def test_reads_node_shapes_and_drain_flag():
    old = node_from_json({"name": "n1", "state": "idle", "state_flags": ["DRAIN"], "reason": "slurm_mm: x"})
    new = node_from_json({"name": "n1", "state": ["IDLE", "DRAIN"], "reason": "slurm_mm: x"})
    assert old.draining and new.draining
    assert old.state == new.state == "idle"


def test_unreadable_record_is_a_one_line_error():
    with pytest.raises(SlurmError, match="unreadable job record"):
        job_from_json({"job_state": "RUNNING"})


@pytest.mark.cluster
def test_client_sees_a_running_job_on_the_real_cluster(cluster, job_dir, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(cluster.slurm_conf))
    proc = tc.sbatch(cluster, "#!/bin/sh\nsleep 60\n", "-o", "/dev/null", cwd=job_dir)
    job_id = tc.job_id(proc)
    try:
        info = tc.wait_job(cluster, job_id, {"RUNNING"}, timeout=30)
        client = CommandClient()
        job = client.job(job_id)
        assert job.state == "RUNNING"
        assert job.batch_host == info["BatchHost"]
        assert job.user_id == int(info["UserId"].split("(")[1].rstrip(")"))
        assert job.restart_count == 0 and job.start_time > 0
        assert job_id in {j.job_id for j in client.jobs(job.batch_host)}
        assert client.node(job.batch_host).state in ("allocated", "mixed")
        with pytest.raises(SlurmError, match="job 999999 not found|Invalid job id"):
            client.job("999999")
    finally:
        os.system(f"SLURM_CONF={cluster.slurm_conf} scancel {job_id}")
