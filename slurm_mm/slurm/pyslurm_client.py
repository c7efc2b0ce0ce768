"""The Slurm client on pyslurm's object API (pyslurm 25.x: `pyslurm.Job`, `Jobs`, `Node`).

Same methods and results as CommandClient, without starting a command per call. Used
by connect() only when pyslurm imports and was built for the running Slurm: pyslurm's
version is `SLURM_MAJOR.SLURM_MINOR.PATCH` (25.5.x for Slurm 25.05), and a pyslurm
built against another Slurm mis-reads the C structures it is handed. The constructor
checks that against `slurmd -V` (or `sinfo -V`, `scontrol -V`) and raises SlurmError
otherwise, so connect() falls back to the commands.

Tested here only with a stand-in `pyslurm` module (tests/test_pyslurm_client.py):
pyslurm does not install on these machines (Slurm 22.05, no headers), so the calls
below follow pyslurm's 25.x documentation and sources, never a real libslurm. Knows
Slurm, never CRIU.
"""

from __future__ import annotations

from typing import Any

import pyslurm  # ImportError: connect() uses the commands

from slurm_mm.errors import SlurmError
from slurm_mm.slurm.commands import CommandClient
from slurm_mm.slurm.model import Job, Node
from slurm_mm.slurm.version import major_minor as _major_minor
from slurm_mm.slurm.version import running_slurm_version

# pyslurm's error type for failed RPCs (pyslurm.core.error.RPCError, exported at the top).
_RPC_ERROR = getattr(pyslurm, "RPCError", ())


def _time(value: Any) -> int:
    """pyslurm gives unset times as None (or 0)."""
    return int(value) if value else 0


def _node_state(text: str) -> tuple[str, tuple[str, ...]]:
    """("idle", ("DRAIN",)) from pyslurm's complete state string "IDLE+DRAIN"."""
    parts = [p for p in str(text or "UNKNOWN").split("+") if p]
    return (parts[0].lower() if parts else "unknown"), tuple(p.upper() for p in parts[1:])


class PyslurmClient:
    """Talks to Slurm through pyslurm (when it matches the running Slurm)."""

    def __init__(self) -> None:
        mine = str(getattr(pyslurm, "__version__", "") or "")
        running = running_slurm_version()
        if not mine or _major_minor(mine) != _major_minor(running):
            raise SlurmError(f"pyslurm {mine or '(unknown version)'} was not built for {running}")
        self.version = mine
        self._commands = CommandClient()

    @staticmethod
    def _call(what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _RPC_ERROR as exc:
            raise SlurmError(f"{what}: {' '.join(str(exc).split())}") from None
        except (ValueError, TypeError, AttributeError) as exc:
            raise SlurmError(f"{what}: pyslurm {pyslurm.__version__}: {exc}") from None

    @staticmethod
    def _job(job: Any) -> Job:
        return Job(
            job_id=str(job.id),
            user_id=int(job.user_id),
            group_id=int(job.group_id or 0),
            state=str(job.state or "UNKNOWN").split("+")[0],
            batch_host=str(job.batch_host or ""),
            restart_count=int(job.requeue_count or 0),
            preempt_time=_time(job.preempt_time),
            start_time=_time(job.start_time),
            nodes=str(job.allocated_nodes or ""),
            partition=str(job.partition or ""),
            requeue=bool(job.is_requeueable),
            exit_code=None if job.exit_code is None else int(job.exit_code),
            work_dir=str(job.working_directory or ""),
        )

    def job(self, job_id: str) -> Job:
        if not job_id.isdigit():
            raise SlurmError(f"invalid job id '{job_id}'")
        return self._call(f"job {job_id}", lambda: self._job(pyslurm.Job.load(int(job_id))))

    def jobs(self, node: str | None = None) -> list[Job]:
        jobs = self._call("loading jobs", lambda: [self._job(j) for j in pyslurm.Jobs.load().values()])
        # As CommandClient: slurm_mm cares about the batch host, not any node of a job.
        return [j for j in jobs if node is None or j.batch_host == node]

    def node(self, name: str) -> Node:
        def load() -> Node:
            n = pyslurm.Node.load(name)
            state, flags = _node_state(n.state)
            return Node(name=str(n.name), state=state, flags=flags, reason=str(n.reason or ""))

        return self._call(f"node '{name}'", load)

    def requeue(self, job_id: str, hold: bool = False) -> None:
        if not job_id.isdigit():
            raise SlurmError(f"invalid job id '{job_id}'")
        self._call(f"requeue of job {job_id}", lambda: pyslurm.Job(int(job_id)).requeue(hold=hold))

    # pyslurm has no call for these; Slurm's commands do them (same results either way).
    def set_admin_comment(self, job_id: str, text: str) -> None:
        self._commands.set_admin_comment(job_id, text)

    def preempt_mode(self, partition: str) -> str:
        return self._commands.preempt_mode(partition)

    def grace_time(self, partition: str) -> int:
        return self._commands.grace_time(partition)

    def run_in_job(self, job_id: str, node: str, argv: list[str], env: dict[str, str]) -> int:
        return self._commands.run_in_job(job_id, node, argv, env)

    def drain(self, node: str, reason: str) -> None:
        self._call(f"drain of node '{node}'",
                   lambda: pyslurm.Node.load(node).modify(pyslurm.Node(state="DRAIN", reason=reason)))
