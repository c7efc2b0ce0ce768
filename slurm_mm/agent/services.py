"""What a job supervisor (and its step code) gets from its node, by constructor.

The node agent builds one NodeServices and hands it to every JobSupervisor; nothing
below the agent reaches back into the agent itself.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from slurm_mm.agent.job_record import JobRecord, LaunchRequest
from slurm_mm.agent.preemption import PreemptNotice, Preemption
from slurm_mm.checkpointer import JobCheckpointer, ProcessTree
from slurm_mm.config import Config
from slurm_mm.slurm.model import SlurmClient
from slurm_mm.store import Image, Trigger

J = TypeVar("J")


class JobRegistry(Generic[J]):
    """The jobs supervised on this node, by job id (thread-safe)."""

    def __init__(self) -> None:
        self._jobs: dict[str, J] = {}
        self.lock = threading.Lock()

    def get(self, job_id: str) -> J | None:
        with self.lock:
            return self._jobs.get(job_id)

    def add_unless(self, job_id: str, job: J, busy) -> J | None:
        """Register `job` unless an entry for which `busy(entry)` holds is there; that entry, or None."""
        with self.lock:
            earlier = self._jobs.get(job_id)
            if earlier is not None and busy(earlier):
                return earlier
            self._jobs[job_id] = job
            return None

    def forget(self, job_id: str, job: J | None = None) -> None:
        """Drop job_id's entry (only if it is still `job`, when given)."""
        with self.lock:
            if job is None or self._jobs.get(job_id) is job:
                self._jobs.pop(job_id, None)

    def items(self) -> list[tuple[str, J]]:
        with self.lock:
            return list(self._jobs.items())

    def __contains__(self, job_id: object) -> bool:
        with self.lock:
            return job_id in self._jobs


@dataclass
class NodeServices:
    node: str
    config: Config
    slurm: SlurmClient
    checkpointer: JobCheckpointer
    preemption: Preemption
    jobs: JobRegistry = field(default_factory=JobRegistry)
    poll_interval: float = 2.0  # seconds between the watcher's looks at Slurm


class SupervisedJob(Protocol):
    """What the step code (agent/steps.py, agent/step_launch.py) uses of a job's supervisor."""

    services: NodeServices
    job_id: str
    epoch: int
    preempt_notice: PreemptNotice
    req: LaunchRequest
    record: JobRecord
    tree: ProcessTree | None
    lock: threading.Lock

    def tell(self, text: str) -> None: ...
    def send(self, message: dict) -> None: ...
    def checkpoint(self, trigger: Trigger, requeue: bool = False, defer_requeue: bool = False) -> Image | None: ...
