"""connect() picks pyslurm only when it matches the running Slurm, else Slurm's commands.

pyslurm cannot be installed here, so a minimal stand-in `pyslurm` module (the 25.x
names: Job, Jobs, Node, RPCError, __version__) is put into sys.modules, and a stand-in
`slurmd -V` on PATH says which Slurm runs. These tests check the backend choice and
the mapping of pyslurm's objects onto Job/Node; they say nothing about the real pyslurm
against a real libslurm, which is untested here.
"""

from __future__ import annotations

import os
import sys
import inspect
import types

import pytest

from slurm_mm.errors import SlurmError
from slurm_mm.slurm.client import CommandClient, SlurmClient, connect


class FakeRPCError(Exception):
    pass


def _fake_pyslurm(version: str, calls: list) -> types.ModuleType:
    class Job:
        def __init__(self, job_id=None):
            self.id = job_id
            self.user_id, self.group_id, self.state = 1001, 1001, "RUNNING"
            self.batch_host, self.requeue_count = "n2", 1
            self.preempt_time, self.start_time = None, 1700000000
            self.allocated_nodes, self.partition = "n2", "low"
            self.is_requeueable, self.exit_code, self.working_directory = True, 0, "/home/u"

        @staticmethod
        def load(job_id):
            if job_id == 999:
                raise FakeRPCError("Invalid job id specified")
            return Job(job_id)

        def requeue(self, hold=False):
            calls.append(("requeue", self.id, hold))

    class Jobs:
        @staticmethod
        def load():
            on_n3 = Job(8)
            on_n3.batch_host = "n3"
            return {7: Job(7), 8: on_n3}

    class Node:
        def __init__(self, name=None, **changes):
            self.name, self.changes = name, changes
            self.state, self.reason = "IDLE+DRAIN", "slurm_mm: x"

        @staticmethod
        def load(name):
            return Node(name)

        def modify(self, changes):
            calls.append(("modify", self.name, changes.changes))

    module = types.ModuleType("pyslurm")
    module.__version__ = version
    module.Job, module.Jobs, module.Node, module.RPCError = Job, Jobs, Node, FakeRPCError
    return module


@pytest.fixture
def with_pyslurm(monkeypatch, tmp_path):
    """Install a stand-in pyslurm of a given version, with `slurmd -V` saying 25.05.1."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    slurmd = bin_dir / "slurmd"
    slurmd.write_text("#!/bin/sh\necho 'slurm 25.05.1'\n")
    slurmd.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    calls: list = []

    def install(version: str) -> list:
        monkeypatch.setitem(sys.modules, "pyslurm", _fake_pyslurm(version, calls))
        monkeypatch.delitem(sys.modules, "slurm_mm.slurm.pyslurm_client", raising=False)
        return calls

    yield install
    # Never leave a client module bound to the stand-in for later tests.
    sys.modules.pop("slurm_mm.slurm.pyslurm_client", None)


def test_connect_uses_the_commands_when_pyslurm_is_another_slurms(with_pyslurm):
    with_pyslurm("24.11.0")
    assert isinstance(connect(), CommandClient)
    from slurm_mm.slurm.pyslurm_client import PyslurmClient  # noqa: PLC0415

    with pytest.raises(SlurmError, match=r"^pyslurm 24\.11\.0 was not built for slurm 25\.05\.1$"):
        PyslurmClient()


def test_connect_uses_pyslurm_built_for_the_running_slurm(with_pyslurm):
    calls = with_pyslurm("25.5.0")
    client = connect()
    assert type(client).__name__ == "PyslurmClient" and client.version == "25.5.0"

    job = client.job("7")
    assert (job.job_id, job.state, job.batch_host, job.restart_count) == ("7", "RUNNING", "n2", 1)
    assert (job.preempt_time, job.start_time, job.requeue, job.exit_code) == (0, 1700000000, True, 0)
    assert [j.job_id for j in client.jobs("n3")] == ["8"], "jobs(node) keeps the batch host's jobs"
    node = client.node("n1")
    assert (node.state, node.flags, node.draining) == ("idle", ("DRAIN",), True)

    client.requeue("7")
    client.drain("n1", "slurm_mm: maintenance")
    assert calls == [("requeue", 7, False),
                     ("modify", "n1", {"state": "DRAIN", "reason": "slurm_mm: maintenance"})]
    with pytest.raises(SlurmError, match=r"^job 999: Invalid job id specified$"):
        client.job("999")


def test_connect_uses_the_commands_without_pyslurm(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyslurm", None)  # import pyslurm -> ImportError
    monkeypatch.delitem(sys.modules, "slurm_mm.slurm.pyslurm_client", raising=False)
    assert isinstance(connect(), CommandClient)
    assert "slurm_mm.slurm.pyslurm_client" not in sys.modules


def test_slurm_version_comes_from_its_own_commands(with_pyslurm):
    with_pyslurm("25.5.0")
    from slurm_mm.slurm.pyslurm_client import _major_minor, running_slurm_version  # noqa: PLC0415

    assert running_slurm_version() == "slurm 25.05.1"
    assert _major_minor("slurm-wlm 22.05.8") == (22, 5) == _major_minor("22.5.0")


def _signature_of(cls: type, name: str) -> inspect.Signature:
    return inspect.signature(getattr(cls, name))


def test_both_backends_satisfy_the_slurm_client_protocol(with_pyslurm):
    """Every call of the protocol exists on both backends with the protocol's parameters:
    a backend missing one would end the agent's watcher with an AttributeError."""
    with_pyslurm("25.5.0")
    from slurm_mm.slurm.pyslurm_client import PyslurmClient  # noqa: PLC0415

    calls = [n for n, v in vars(SlurmClient).items() if callable(v) and not n.startswith("_")]
    assert {"job", "jobs", "node", "requeue", "drain", "preempt_mode", "run_in_job",
            "set_admin_comment"} <= set(calls)
    for backend in (CommandClient, PyslurmClient):
        for name in calls:
            assert hasattr(backend, name), f"{backend.__name__} lacks {name}"
            wanted = list(_signature_of(SlurmClient, name).parameters)
            assert list(_signature_of(backend, name).parameters) == wanted, (backend.__name__, name)
    assert isinstance(CommandClient(), SlurmClient) and isinstance(connect(), SlurmClient)


def test_pyslurm_backend_hands_what_pyslurm_lacks_to_the_commands(with_pyslurm, tmp_path, monkeypatch):
    with_pyslurm("25.5.0")
    client = connect()
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.write_text("#!/bin/sh\necho 'PartitionName=low PreemptMode=requeue State=UP'\n")
    scontrol.chmod(0o755)
    assert client.preempt_mode("low") == "REQUEUE"
