"""Checkpointing a job's process tree: GPU state into host memory, then a CRIU dump.

Order (docs/design.md, measured facts): the CUDA checkpoint API hangs on stopped or frozen processes, so the
GPU step runs first, on the running tree; its lock blocks the app's CUDA calls, so GPU
state cannot change before CRIU freezes and dumps the tree.

A tree with its own mount namespace (launch(private_proc=True)) is found here, not told:
its dump and engine.json say so, and restore_tree() adds what CRIU then needs. Files
its processes hold that live outside that namespace (a restored job's new stdout, opened
by the restorer) are dumped as external and must be handed back at restore.

Guarantee (a failed checkpoint never harms the job): if anything fails after the GPU step, the GPU state is
restored and unlocked and the job keeps running; the error is raised (CheckpointFailed,
with CRIU's log excerpt). What this never does: decide where images live (it is handed a
directory), talk to Slurm, or kill a job except through CRIU's own end of dump.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Protocol, Sequence

from slurm_mm.engine import filestate, proctree
from slurm_mm.engine.criu import Criu, ImageFiles
from slurm_mm.engine.outside_files import outside_files, own_mount_ns
from slurm_mm.errors import CheckpointFailed, GpuError

METADATA = "engine.json"
METADATA_FORMAT = 1


class GpuCheckpointing(Protocol):
    """What the CPU engine needs of a GPU checkpointer (slurm_mm.engine.gpu.GpuCheckpointer).

    `suspend(pids)`: on running processes, lock and checkpoint every CUDA process among
    `pids`; returns those; all or nothing (raises GpuError having rolled back).
    `resume(pids)`: restore and unlock every locked/checkpointed process among `pids`;
    returns those resumed; raises GpuError naming the ones it could not.
    """

    def suspend(self, pids: Iterable[int]) -> list[int]: ...

    def resume(self, pids: Iterable[int]) -> list[int]: ...


@dataclass
class CheckpointResult:
    images_dir: Path
    init_pid: int  # host PID of the namespace init at dump time
    pids: list[int]  # host PIDs of the tree at dump time
    ns_pids: dict[int, int]  # host PID -> PID inside the job's namespace
    gpu_pids: list[int]  # host PIDs whose GPU state is in the image
    leave_running: bool
    image_bytes: int
    criu_version: str
    timings: dict[str, float] = field(default_factory=dict)  # seconds: gpu_suspend, dump, gpu_resume, total
    mount_ns: bool = False  # the tree had a mount namespace of its own
    external_files: dict[str, str] = field(default_factory=dict)  # CRIU key -> path, to hand back at restore
    files: dict = field(default_factory=dict)  # file state summary: count, saved_bytes, same_node_only, notes, pins


def _tree_snapshot(
    init_pid: int, outside: dict[tuple[int, int], tuple[str, str]] | None = None,
) -> tuple[list[int], dict[int, int], dict[str, dict], list[dict]]:
    pids = proctree.tree_pids(init_pid)
    ns_pids: dict[int, int] = {}
    processes = []
    for pid in pids:
        ids = proctree.task_ids(pid)
        if ids is None:
            continue
        ns_pids[pid] = ids.ns_pid
        processes.append({"ns_pid": ids.ns_pid, "uid": ids.uids[0], "gid": ids.gids[0]})
    # The job's stdio is that of the app: the init's first child (mm-init's own 0/1/2
    # are /dev/null). Restore can put new fds in their place (--inherit-fd).
    stdio: dict[str, dict] = {}
    kids = sorted(proctree.children(init_pid), key=lambda p: ns_pids.get(p, p))
    if kids:
        for fd in (0, 1, 2):
            f = proctree.open_file(kids[0], fd)
            if f is not None:
                stdio[str(fd)] = f.to_json()
                ext = (outside or {}).get((kids[0], fd))
                if ext:  # dumped as external: restore hands it back by this key
                    stdio[str(fd)].update(criu_key=ext[0], external=True)
    return pids, ns_pids, stdio, processes


def _refuse_unfit(pids: Sequence[int], gpu: GpuCheckpointing | None) -> None:
    """Refuse, before touching anything, trees that would hang the dump or the GPU step."""
    for pid in pids:
        cgroup = proctree.frozen_cgroup(pid)
        if cgroup:
            raise CheckpointFailed(f"pid {pid} is in frozen cgroup {cgroup}: checkpoint only running jobs")
        if gpu is not None:
            ids = proctree.task_ids(pid)
            if ids and ids.state in ("T", "t"):
                raise CheckpointFailed(f"pid {pid} is stopped: the GPU checkpoint would hang")


def checkpoint_tree(
    init_pid: int,
    images_dir: str | os.PathLike,
    *,
    leave_running: bool,
    gpu: GpuCheckpointing | None = None,
    criu: Criu | None = None,
    log_path: str | os.PathLike | None = None,
    extra_criu_args: Sequence[str] = (),
    timeout: float | None = None,
    files: filestate.CaptureSpec | None = None,
    leave_stopped: bool = False,
) -> CheckpointResult:
    """Checkpoint the tree whose namespace init has host PID `init_pid` into `images_dir`.

    `leave_running`: the job goes on after the dump (periodic checkpoints); otherwise
    CRIU kills the tree once the image is complete (preemption, drain). `gpu`: a
    GpuCheckpointing, or None on a node without GPUs. Writes CRIU's files, its log
    (dump.log unless `log_path`) and engine.json (what restore_tree needs) into
    `images_dir`, which is created (0700) if missing. `files`: record the tree's files
    with the image (filestate.capture, run while CRIU holds the tree frozen); its
    init_pid and images_dir are filled in here. `leave_stopped` (without `leave_running`):
    CRIU leaves the tree SIGSTOPped for the caller to resume; a tree with GPU state is
    left running instead (its GPU resume would hang on a stopped process).
    Raises CheckpointFailed, the job still running.
    """
    criu = criu or Criu()
    images_dir = Path(images_dir)
    images_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    started = time.monotonic()
    timings: dict[str, float] = {}

    if not proctree.alive(init_pid):
        raise CheckpointFailed(f"no running process {init_pid} to checkpoint")
    mount_ns = own_mount_ns(init_pid)
    outside = outside_files(init_pid, proctree.tree_pids(init_pid))
    pids, ns_pids, stdio, processes = _tree_snapshot(init_pid, outside)
    external = {key: path for key, path in outside.values()}
    _refuse_unfit(pids, gpu)
    version = criu.version()

    gpu_pids: list[int] = []
    if gpu is not None:
        t = time.monotonic()
        try:
            gpu_pids = list(gpu.suspend(pids))
        except GpuError as exc:
            raise CheckpointFailed(f"GPU checkpoint of pid {init_pid}'s tree failed: {exc}") from exc
        timings["gpu_suspend"] = time.monotonic() - t

    try:
        with tempfile.TemporaryDirectory(prefix="slurm_mm-dump-") as work:
            action, ghost_limit = None, None
            if files is not None:
                spec = filestate.CaptureSpec(**{**vars(files), "init_pid": init_pid,
                                                "images_dir": str(images_dir)})
                action = filestate.post_dump_script(Path(work), spec)
                ghost_limit = max(files.budget, 1 << 20)
            if leave_stopped and gpu_pids:
                leave_running = True
            stats = criu.dump(init_pid, images_dir, leave_running=leave_running,
                              leave_stopped=leave_stopped, log_path=log_path,
                              mount_ns=mount_ns, external_files=sorted(external),
                              action_script=action, ghost_limit=ghost_limit,
                              extra_args=extra_criu_args, timeout=timeout)
    except CheckpointFailed as exc:
        if gpu_pids:
            _roll_back_gpu(gpu, gpu_pids, exc)
        raise
    timings["dump"] = stats.seconds
    summary: dict = {}
    if files is not None:
        state = filestate.FileState.read(images_dir)
        if state is None:
            raise CheckpointFailed(f"the image of pid {init_pid}'s tree has no record of its files",
                                   "post-dump action did not write " + filestate.STATE_FILE)
        summary = {"count": len(state.records), "saved_bytes": state.saved_bytes,
                   "same_node_only": state.same_node_only, "notes": state.notes, "pins": state.pins}

    if leave_running and gpu_pids:
        t = time.monotonic()
        try:
            gpu.resume(gpu_pids)  # type: ignore[union-attr]
        except GpuError as exc:
            raise CheckpointFailed(
                f"image of pid {init_pid}'s tree written, but its GPU state could not be resumed: {exc}"
            ) from exc
        timings["gpu_resume"] = time.monotonic() - t

    timings["total"] = time.monotonic() - started
    result = CheckpointResult(
        images_dir=images_dir,
        init_pid=init_pid,
        pids=pids,
        ns_pids=ns_pids,
        gpu_pids=gpu_pids,
        leave_running=leave_running,
        image_bytes=0,
        criu_version=version,
        timings=timings,
        mount_ns=mount_ns,
        external_files=external,
        files=summary,
    )
    _write_metadata(result, stdio, processes)
    result.image_bytes = ImageFiles.scan(images_dir).total_bytes
    return result


def _roll_back_gpu(gpu: GpuCheckpointing | None, gpu_pids: list[int], cause: CheckpointFailed) -> None:
    """After a failed dump: give the still-running processes their GPU state back."""
    try:
        gpu.resume(gpu_pids)  # type: ignore[union-attr]
    except GpuError as exc:
        raise CheckpointFailed(
            f"{cause}; and GPU state of {gpu_pids} could not be resumed: {exc}", cause.log_excerpt
        ) from exc


def _write_metadata(result: CheckpointResult, stdio: dict, processes: list[dict]) -> None:
    meta = {
        "format": METADATA_FORMAT,
        "criu_version": result.criu_version,
        "kernel": platform.release(),
        "created": time.time(),
        "init_pid": result.init_pid,
        "processes": processes,
        "stdio": stdio,
        "gpu_ns_pids": sorted(result.ns_pids[p] for p in result.gpu_pids if p in result.ns_pids),
        "leave_running": result.leave_running,
        "timings": result.timings,
        "mount_ns": result.mount_ns,
        "external_files": result.external_files,
    }
    path = result.images_dir / METADATA
    tmp = path.with_name(METADATA + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def result_dict(result: CheckpointResult) -> dict:
    """A CheckpointResult as plain JSON-able data (for manifests and `--json` output)."""
    d = asdict(result)
    d["images_dir"] = str(result.images_dir)
    d["ns_pids"] = {str(k): v for k, v in result.ns_pids.items()}
    return d
