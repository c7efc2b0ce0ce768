"""What the agent holds about one job on its node: the batch task's request, the job's
state, and what `slurm-mm status` shows. Data only, shared by the supervisor, the step
code and the server without any of them importing another."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from slurm_mm.engine.owner import Owner
from slurm_mm.slurm.model import Job


class JobState(StrEnum):
    """A supervised job's life on this node (`slurm-mm status` shows the value)."""

    STARTING = "starting"  # restoring or launching its tree
    RUNNING = "running"  # its tree runs; checkpoints may be taken
    CHECKPOINTED = "checkpointed"  # a stopping image was taken: the tree's end is not the job's
    REQUEUED = "requeued"  # Slurm took the requeue (or the restore policy held it)
    EXITED = "exited"  # its tree ended on its own


# What the batch task exits with once its job is requeued (128 + SIGTERM, as if Slurm's own
# kill had ended it; never 0, so that a requeue that somehow did not take never reads as success).
REQUEUED_EXIT = 143

# States in which a second `start` of the job is refused (its tree is or will be there).
ACTIVE = frozenset({JobState.STARTING, JobState.RUNNING})


@dataclass
class LaunchRequest:
    """What the batch task (or a step task) asked for; only argv/env/cwd come from the user."""

    job: Job
    uid: int
    gid: int
    groups: list[int]
    argv: list[str]
    env: dict[str, str]
    cwd: str
    stdio: list[int]
    cgroup_procs: list[Path]
    interval: int

    @property
    def owner(self) -> Owner:
        return Owner(self.uid, self.gid, tuple(self.groups))


@dataclass
class CheckpointProgress:
    """The checkpoint or restore in flight, live (bytes are updated by the store)."""

    phase: str = "idle"  # dumping, writing, extracting, restoring
    trigger: str = ""
    started: float = 0.0
    bytes_done: int = 0
    bytes_total: int = 0
    mode: str = ""  # async (node-local staging) or direct (shared filesystem)


@dataclass
class JobRecord:
    """What `slurm-mm status` shows about a job on this node."""

    job_id: str
    uid: int
    interval: int
    mode: str = ""
    state: JobState = JobState.STARTING
    last_image: dict[str, Any] = field(default_factory=dict)
    progress: CheckpointProgress = field(default_factory=CheckpointProgress)
    last_error: str = ""
    refused: str = ""  # why checkpoints of this job are refused (steps.py)
