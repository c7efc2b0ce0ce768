"""`slurm-mm checkpoint JOBID`, `slurm-mm drain NODE`, `slurm-mm status`: Slurm-level commands.

They compose the Slurm client, the store and the node agents; the agents do the
privileged work and check who asks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from tabulate import tabulate

from slurm_mm import config
from slurm_mm.agent.client import request
from slurm_mm.durations import format_interval
from slurm_mm.errors import AgentUnavailable, PermissionDenied, SlurmError, SlurmMMError, UsageError
from slurm_mm.slurm.client import connect

DRAIN_PREFIX = "slurm_mm:"
VIA_SRUN = "SLURM_MM_VIA_SRUN"  # set in the step srun starts, so it never recurses


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help="checkpoint an enrolled job (or a process with --pid)")
    p.add_argument("job_id", nargs="?", help="Slurm job id")
    p.add_argument("--requeue", action="store_true", help="stop the job after the image and requeue it")
    p.add_argument("--pid", type=int, help="checkpoint a process tree instead of a job (root)")
    p.add_argument("--to", help="with --pid: job directory to write the image into")
    p.add_argument("--leave-running", action="store_true", help="with --pid: keep the tree running")
    p.set_defaults(func=run_checkpoint)

    d = sub.add_parser("drain", help="checkpoint and requeue every enrolled job on a node, then drain it")
    d.add_argument("node")
    d.add_argument("--reason", required=True, help="drain reason shown by sinfo")
    d.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the jobs to leave")
    d.set_defaults(func=run_drain)

    s = sub.add_parser("status", help="enrolled jobs, their last image and checkpoints in progress")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_status)


def _job_id(text: str | None) -> str:
    if not text or not text.isdigit():
        raise UsageError(f"invalid job id '{text or ''}'")
    return text


def run_checkpoint(args: argparse.Namespace) -> int:
    if args.pid is not None:
        from slurm_mm.cli.image_cmds import checkpoint_pid  # noqa: PLC0415

        return checkpoint_pid(args)
    if args.to or args.leave_running:
        raise UsageError("--to and --leave-running go with --pid")
    job_id = _job_id(args.job_id)
    cfg = config.load()
    slurm = connect()
    job = slurm.job(job_id)
    if job.state != "RUNNING":
        raise UsageError(f"job {job_id} is {job.state}, not RUNNING")
    message = {"op": "checkpoint", "job_id": job_id, "requeue": args.requeue}
    try:
        reply = request(config.agent_socket(cfg, job.batch_host), message)
    except AgentUnavailable:
        if os.environ.get(VIA_SRUN):
            raise
        # The agent is on the job's node, not here: run this command there, in the job.
        argv = ["slurm-mm", "checkpoint", job_id] + (["--requeue"] if args.requeue else [])
        return slurm.run_in_job(job_id, job.batch_host, argv, {VIA_SRUN: "1"})
    done = "checkpointed and requeued" if reply.get("requeued") else "checkpointed"
    print(f"job {job_id}: {done} to image {reply['image']}")
    return 0


def run_drain(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise PermissionDenied("slurm-mm drain must be run by root (it drains a node)")
    if not args.reason.strip():
        raise UsageError("--reason must not be empty")
    cfg = config.load()
    slurm = connect()
    slurm.node(args.node)  # fails with a clear error for an unknown node
    enrolled = _enrolled_jobs(cfg, slurm.jobs(args.node))
    # Drain first so that requeued jobs cannot come back here. The node agents see the
    # slurm_mm reason and checkpoint + requeue their jobs (works from any host).
    slurm.drain(args.node, f"{DRAIN_PREFIX} {args.reason}")
    for job in enrolled:
        try:
            request(config.agent_socket(cfg, args.node),
                    {"op": "checkpoint", "job_id": job.job_id, "requeue": True, "trigger": "drain"})
        except (AgentUnavailable, SlurmError):
            pass  # the agent's watcher acts on the drain reason
        except SlurmMMError as exc:  # reported; the watcher still acts on the drain reason
            print(f"slurm-mm: job {job.job_id}: {exc}", file=sys.stderr)
    deadline = time.monotonic() + args.timeout
    waiting = {j.job_id for j in enrolled}
    while waiting and time.monotonic() < deadline:
        still = {j.job_id for j in slurm.jobs(args.node) if j.state == "RUNNING"}
        waiting &= still
        if waiting:
            time.sleep(1)
    rows = [[j.job_id, "still running" if j.job_id in waiting else "requeued"] for j in enrolled]
    print(tabulate(rows, headers=["job", "result"]) if rows else "no enrolled jobs on the node")
    print(f"node {args.node} drained: {DRAIN_PREFIX} {args.reason}")
    return 1 if waiting else 0


def _enrolled_jobs(cfg: config.Config, jobs):
    return [j for j in jobs if j.state == "RUNNING" and (cfg.checkpoint_root / j.job_id).is_dir()]


def _agent_jobs(cfg: config.Config, nodes: set[str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for node in sorted(nodes):
        try:
            reply = request(config.agent_socket(cfg, node), {"op": "status"}, timeout=10)
        except (AgentUnavailable, SlurmError):
            continue
        for entry in reply.get("jobs", []):
            found[entry["job_id"]] = entry
    return found


def status_rows(cfg: config.Config) -> list[dict[str, Any]]:
    slurm = connect()
    jobs = [j for j in slurm.jobs() if j.state in ("RUNNING", "PENDING", "SUSPENDED")]
    if os.geteuid() != 0:
        jobs = [j for j in jobs if j.user_id == os.geteuid()]
    live = _agent_jobs(cfg, {j.batch_host for j in jobs if j.batch_host})
    from slurm_mm.checkpointer import open_store  # noqa: PLC0415

    store = open_store(cfg)
    rows = []
    for job in jobs:
        agent = live.get(job.job_id)
        if agent is None and not (cfg.checkpoint_root / job.job_id).is_dir():
            continue  # not enrolled
        images = _images_quietly(store, job.job_id)
        last = images[0].manifest if images else None
        progress = (agent or {}).get("progress", {})
        rows.append({
            "job_id": job.job_id, "user_id": job.user_id, "state": job.state,
            "node": job.batch_host, "restarts": job.restart_count,
            "interval": (agent or {}).get("interval"),
            "mode": (agent or {}).get("mode", ""),
            "last_image": None if last is None else {
                "name": images[0].path.name, "age": round(time.time() - last.created),
                "size": sum(f.stored_size for f in last.files), "trigger": last.trigger},
            "in_progress": progress if progress.get("phase", "idle") != "idle" else None,
            "refused": (agent or {}).get("refused", ""),
        })
    return rows


def _images_quietly(store, job_id: str):
    try:
        return store.images(job_id)
    except (SlurmMMError, OSError):  # unreadable (other user's) dirs show as none
        return []


def _human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def run_status(args: argparse.Namespace) -> int:
    rows = status_rows(config.load())
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = []
    for r in rows:
        last = r["last_image"]
        prog = r["in_progress"]
        table.append([
            r["job_id"], r["state"], r["node"],
            format_interval(r["interval"]) if r["interval"] is not None else "?",
            "-" if last is None else f"{last['name']} ({last['trigger']}, {last['age']}s ago, {_human_bytes(last['size'])})",
            "-" if prog is None else _progress_text(prog),
        ])
    headers = ["job", "state", "node", "interval", "last image", "in progress"]
    if any(r["refused"] for r in rows):  # jobs slurm_mm cannot capture whole (agent/steps.py)
        headers.append("not checkpointed because")
        for line, r in zip(table, rows):
            line.append(r["refused"] or "-")
    print(tabulate(table, headers=headers) if table else "no enrolled jobs")
    return 0


def _progress_text(prog: dict[str, Any]) -> str:
    """`restore extracting 1.2 MiB/3.6 MiB (0.8 MiB/s, 1.5 s)`: the phase, bytes so far and
    time since the step began; no rate before the first byte (it would read 0 B/s)."""
    done, total = prog.get("bytes_done", 0), prog.get("bytes_total", 0)
    elapsed = max(time.time() - prog.get("started", time.time()), 0.0)
    text = f"{prog.get('trigger', '')} {prog.get('phase', '')}"
    if total:
        text += f" {_human_bytes(done)}/{_human_bytes(total)}"
    rate = f"{_human_bytes(done / elapsed)}/s, " if done and elapsed > 0 else ""
    return text + f" ({rate}{elapsed:.1f} s)"
