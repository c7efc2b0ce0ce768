"""The default Slurm backend: it runs Slurm's own commands (`squeue --json`, `sinfo --json`, `scontrol`),
reading both JSON shapes seen on these machines: 22.05 (data_parser v0.0.38: plain
strings and integers; `sinfo --json` lists node records under "nodes") and 24.11
(v0.0.42: `job_state` is a list, numbers are `{set, infinite, number}` objects, and
`sinfo --json` lists one summary record per partition and node state under "sinfo",
each naming its nodes in `nodes.nodes`). tests/data/slurm-24.11/ holds recorded output. pyslurm is used when it is installed and matches
the running Slurm. Nothing else in slurm_mm calls Slurm. It knows Slurm, never CRIU.
"""

from __future__ import annotations

import json
import logging
import subprocess
from typing import Any

from slurm_mm.errors import JobGone, SlurmError
from slurm_mm.slurm.model import COMMAND_TIMEOUT, Job, Node

log = logging.getLogger(__name__)


def _number(value: Any) -> int:
    """An integer from 22.05's plain ints or 24.11's {set, infinite, number} objects."""
    if isinstance(value, dict):
        return int(value.get("number", 0)) if value.get("set", True) and not value.get("infinite") else 0
    if value in (None, ""):
        return 0
    return int(value)


def _state(value: Any) -> str:
    if isinstance(value, list):
        return value[0] if value else "UNKNOWN"
    return str(value)


def _exit_code(value: Any) -> int | None:
    if isinstance(value, dict):  # 24.11: {"status": [...], "return_code": {...}}
        return _number(value.get("return_code", 0))
    return None if value is None else int(value)


def job_from_json(data: dict[str, Any]) -> Job:
    """Build a Job from one entry of `squeue --json`'s "jobs" (either version)."""
    try:
        return Job(
            job_id=str(_number(data["job_id"])),
            user_id=_number(data["user_id"]),
            group_id=_number(data.get("group_id", 0)),
            state=_state(data["job_state"]),
            batch_host=str(data.get("batch_host") or ""),
            restart_count=_number(data.get("restart_cnt", 0)),
            preempt_time=_number(data.get("preempt_time", 0)),
            start_time=_number(data.get("start_time", 0)),
            nodes=str(data.get("nodes") or ""),
            partition=str(data.get("partition") or ""),
            requeue=bool(data.get("requeue", False)),
            exit_code=_exit_code(data.get("exit_code")),
            work_dir=str(data.get("current_working_directory") or ""),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SlurmError(f"unreadable job record from squeue: {exc!r}") from None


def node_from_json(data: dict[str, Any]) -> Node:
    """A Node from one node record (22.05's `sinfo --json`, `scontrol show node --json`)."""
    state = data.get("state", "unknown")
    flags = list(data.get("state_flags", []))
    if isinstance(state, list):  # 24.11: ["IDLE", "DRAIN"]
        flags += state[1:]
        state = state[0] if state else "unknown"
    return Node(name=str(data["name"]), state=str(state).lower(),
                flags=tuple(str(f).upper() for f in flags), reason=str(data.get("reason") or ""))


def nodes_from_sinfo(data: dict[str, Any]) -> list[Node]:
    """Every node in `sinfo --json` output of either shape (each node once)."""
    if isinstance(data.get("nodes"), list):  # 22.05
        try:
            return [node_from_json(entry) for entry in data["nodes"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise SlurmError(f"unreadable node record from sinfo: {exc!r}") from None
    records = data.get("sinfo")
    if not isinstance(records, list):
        raise SlurmError("sinfo --json gave neither 'nodes' nor 'sinfo' records")
    found: dict[str, Node] = {}
    for record in records:  # 24.11: one record per partition x state, naming its nodes
        try:
            names = record["nodes"]["nodes"]
            state = record["node"]["state"]
            reason = record.get("reason") or ""
            if isinstance(reason, dict):
                reason = reason.get("description") or ""
            for name in names:
                found.setdefault(str(name), node_from_json({"name": name, "state": state, "reason": reason}))
        except (KeyError, TypeError, ValueError) as exc:
            raise SlurmError(f"unreadable sinfo record: {exc!r}") from None
    return list(found.values())


class CommandClient:
    """Talks to Slurm through its command-line tools (the default backend)."""

    def _run(self, *argv: str) -> str:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
        except FileNotFoundError:
            raise SlurmError(f"'{argv[0]}' not found: is Slurm installed?") from None
        except subprocess.TimeoutExpired:
            raise SlurmError(f"'{' '.join(argv)}' did not answer within {COMMAND_TIMEOUT:.0f}s") from None
        if proc.returncode != 0:
            message = " ".join(proc.stderr.split()) or f"exit status {proc.returncode}"
            raise SlurmError(f"'{' '.join(argv[:3])}' failed: {message}")
        return proc.stdout

    def _json(self, *argv: str) -> dict[str, Any]:
        out = self._run(*argv)
        try:
            data = json.loads(out)
        except json.JSONDecodeError:
            raise SlurmError(f"'{' '.join(argv[:2])}' returned invalid JSON") from None
        if not isinstance(data, dict):
            raise SlurmError(f"'{' '.join(argv[:2])}' returned unexpected JSON")
        return data

    def job(self, job_id: str) -> Job:
        if not job_id.isdigit():
            raise SlurmError(f"invalid job id '{job_id}'")
        try:
            data = self._json("squeue", "--json", "--states=all", "-j", job_id)
        except SlurmError as exc:
            if "Invalid job id" in str(exc):  # 22.05 and 24.11: the controller does not know it
                raise JobGone(f"job {job_id} not found") from None
            raise
        if data.get("errors"):  # 24.11 may report a failure inside JSON
            raise SlurmError(f"squeue about job {job_id}: {str(data['errors'])[:200]}")
        jobs = [job_from_json(j) for j in data.get("jobs", [])]
        for job in jobs:
            if job.job_id == job_id:
                return job
        raise JobGone(f"job {job_id} not found")

    def jobs(self, node: str | None = None) -> list[Job]:
        argv = ["squeue", "--json"]
        if node:
            argv += ["-w", node]
        jobs = [job_from_json(j) for j in self._json(*argv).get("jobs", [])]
        # squeue -w matches any node of a job; slurm_mm cares about the batch host.
        return [j for j in jobs if node is None or j.batch_host == node]

    def node(self, name: str) -> Node:
        for node in nodes_from_sinfo(self._json("sinfo", "--json", "-n", name)):
            if node.name == name:
                return node
        raise SlurmError(f"node '{name}' not found")

    def requeue(self, job_id: str, hold: bool = False) -> None:
        """Requeue a running job; with `hold`, held for its user (`scontrol release`)."""
        self._run("scontrol", "requeuehold" if hold else "requeue", job_id)

    def run_in_job(self, job_id: str, node: str, argv: list[str], env: dict[str, str]) -> int:
        """Run `argv` as a step of the running job on `node` (srun --overlap); its exit
        code. Slurm authenticates it: only the job's owner or root may do this."""
        exports = ",".join(["ALL", *(f"{k}={v}" for k, v in env.items())])
        cmd = ["srun", f"--jobid={job_id}", "--overlap", "-N1", "-n1", f"--nodelist={node}",
               f"--export={exports}", "--quiet", *argv]
        try:
            return subprocess.run(cmd, timeout=COMMAND_TIMEOUT * 30).returncode
        except FileNotFoundError:
            raise SlurmError("'srun' not found: is Slurm installed?") from None
        except subprocess.TimeoutExpired:
            raise SlurmError(f"'srun --jobid={job_id}' did not finish in time") from None

    def preempt_mode(self, partition: str) -> str:
        """The partition's PreemptMode (REQUEUE, SUSPEND, CANCEL, OFF, ...), upper case."""
        for token in self._run("scontrol", "show", "partition", "-o", partition).split():
            key, _, value = token.partition("=")
            if key == "PreemptMode":
                return value.upper()
        raise SlurmError(f"partition '{partition}' has no PreemptMode")

    def grace_time(self, partition: str) -> int:
        """The partition's GraceTime in seconds (0 when none or unreadable)."""
        for token in self._run("scontrol", "show", "partition", "-o", partition).split():
            key, _, value = token.partition("=")
            if key == "GraceTime":
                return int(value) if value.isdigit() else 0
        return 0

    def drain(self, node: str, reason: str) -> None:
        self._run("scontrol", "update", f"NodeName={node}", "State=DRAIN", f"Reason={reason}")

    def set_admin_comment(self, job_id: str, text: str) -> None:
        """Set the job's AdminComment (root/operators only; shown by scontrol and sacct)."""
        if not job_id.isdigit():
            raise SlurmError(f"invalid job id '{job_id}'")
        self._run("scontrol", "update", f"JobId={job_id}", f"AdminComment={text}")
