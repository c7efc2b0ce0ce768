"""What slurm_mm knows of Slurm: a job, a node, and the client protocol both backends
(commands.CommandClient, pyslurm_client.PyslurmClient) satisfy (tests/test_slurm_protocol.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

COMMAND_TIMEOUT = 30.0


@dataclass(frozen=True)
class Job:
    job_id: str
    user_id: int
    group_id: int
    state: str  # RUNNING, PENDING, COMPLETED, ... (first state flag)
    batch_host: str
    restart_count: int
    preempt_time: int  # unix time the job was selected for preemption; 0 = never
    start_time: int  # unix time this run started
    nodes: str
    partition: str
    requeue: bool
    exit_code: int | None
    work_dir: str


@dataclass(frozen=True)
class Node:
    name: str
    state: str  # lower case base state: idle, allocated, mixed, down, ...
    flags: tuple[str, ...]  # DRAIN, ...
    reason: str

    @property
    def draining(self) -> bool:
        return "DRAIN" in self.flags or "drain" in self.state


@runtime_checkable
class SlurmClient(Protocol):
    """Every call slurm_mm makes to Slurm; SlurmError for anything Slurm refuses or lacks."""

    def job(self, job_id: str) -> Job: ...
    def jobs(self, node: str | None = None) -> list[Job]: ...
    def node(self, name: str) -> Node: ...
    def requeue(self, job_id: str, hold: bool = False) -> None: ...
    def drain(self, node: str, reason: str) -> None: ...
    def preempt_mode(self, partition: str) -> str: ...
    def grace_time(self, partition: str) -> int: ...
    def run_in_job(self, job_id: str, node: str, argv: list[str], env: dict[str, str]) -> int: ...
    def set_admin_comment(self, job_id: str, text: str) -> None: ...
