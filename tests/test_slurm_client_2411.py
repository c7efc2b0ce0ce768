"""The Slurm client on Slurm 24.11's JSON, recorded on a 24.11.5 test cluster (Debian 13).

tests/data/slurm-24.11/: `sinfo --json` with n1 allocated, n2 idle, n3 drained (two
partitions), `squeue --json --states=all -j J` of a running and a completed job,
`scontrol show node n3 --json`, `scontrol show job 1 --json`. Each read the client
does is checked against them, so a reshaped field fails here, not on a site.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slurm_mm.errors import SlurmError
from slurm_mm.slurm import client
from slurm_mm.slurm.client import CommandClient, job_from_json, node_from_json, nodes_from_sinfo

DATA = Path(__file__).parent / "data" / "slurm-24.11"


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def test_recorded_data_is_24_11():
    assert load("sinfo.json")["meta"]["slurm"]["release"].startswith("24.11")
    assert "nodes" not in load("sinfo.json"), "24.11 sinfo has no top-level 'nodes'"


def test_sinfo_records_give_each_node_once_with_state_and_drain():
    nodes = {n.name: n for n in nodes_from_sinfo(load("sinfo.json"))}
    assert sorted(nodes) == ["n1", "n2", "n3"]
    assert nodes["n1"].state == "mixed" and not nodes["n1"].draining
    assert nodes["n2"].state == "idle" and not nodes["n2"].draining
    assert nodes["n3"].draining and nodes["n3"].reason == "slurm_mm: sample"


def test_sinfo_of_2205_shape_still_reads():
    data = {"nodes": [{"name": "n1", "state": "idle", "state_flags": ["DRAIN"], "reason": "x"}]}
    (node,) = nodes_from_sinfo(data)
    assert node.name == "n1" and node.draining


@pytest.mark.parametrize("data", [{}, {"sinfo": [{"node": {}}]}, {"sinfo": "x"}, {"nodes": [{"state": "idle"}]}])
def test_unreadable_sinfo_is_a_one_line_slurm_error(data):
    with pytest.raises(SlurmError):
        nodes_from_sinfo(data)


def test_scontrol_show_node_record_reads():
    node = node_from_json(load("scontrol-node-n3.json")["nodes"][0])
    assert node.name == "n3" and node.draining and node.reason == "slurm_mm: sample"


def test_running_job_record_reads():
    job = job_from_json(load("squeue-j1.json")["jobs"][0])
    assert (job.job_id, job.state, job.batch_host, job.partition) == ("1", "RUNNING", "n1", "low")
    assert job.user_id == 1000 and job.group_id == 1000
    assert job.restart_count == 0 and job.preempt_time == 0 and job.start_time > 1_700_000_000
    assert job.requeue is True and job.work_dir == "/tmp"


def test_completed_job_record_reads():
    job = job_from_json(load("squeue-j2.json")["jobs"][0])
    assert job.state == "COMPLETED" and job.exit_code == 0


def test_scontrol_show_job_json_has_the_squeue_shape():
    a = job_from_json(load("scontrol-job1.json")["jobs"][0])
    b = job_from_json(load("squeue-j1.json")["jobs"][0])
    assert (a.job_id, a.state, a.batch_host) == (b.job_id, b.state, b.batch_host)


class Recorded(CommandClient):
    """CommandClient whose Slurm commands answer with the recorded output."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, ...]] = []

    def _run(self, *argv: str) -> str:
        self.calls.append(argv)
        return (DATA / self.answers[argv[0]]).read_text()


def test_client_node_and_job_calls_on_24_11_output():
    c = Recorded({"sinfo": "sinfo.json", "squeue": "squeue-j1.json"})
    assert c.node("n3").draining
    assert c.node("n1").state == "mixed"
    with pytest.raises(SlurmError, match="node 'n9' not found"):
        c.node("n9")
    assert c.job("1").batch_host == "n1"
    assert [j.job_id for j in c.jobs("n1")] == ["1"] and c.jobs("n2") == []


def test_admin_comment_is_one_scontrol_argument(monkeypatch):
    c = Recorded({"scontrol": "sinfo.json"})
    c.set_admin_comment("12", "slurm_mm last_image=ckpt-1 trigger=periodic")
    assert c.calls == [("scontrol", "update", "JobId=12", "AdminComment=slurm_mm last_image=ckpt-1 trigger=periodic")]
    with pytest.raises(SlurmError, match="invalid job id"):
        c.set_admin_comment("12;rm", "x")
    assert client.COMMAND_TIMEOUT > 0
