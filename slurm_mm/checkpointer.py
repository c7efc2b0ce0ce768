"""The one place that composes engine and store: a job's checkpoint and its restore.

JobCheckpointer owns every step between a process tree and a durable image and back:
where a dump is staged, the CRIU/GPU dump, the GPU inventory, the commit (and the
retention and file pins after it); which image a run may restore, its extract, the
job's files brought back to the image's record, GPU pairing and the CRIU restore. The
node agent's supervisors and the CLI's `checkpoint --pid` / `restore` use the same
object, so the two paths cannot drift apart. It knows no Slurm and no agent protocol.
"""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from slurm_mm.agent import dump_deadline
from slurm_mm.agent.criu_gate import CriuGate
from slurm_mm.agent.criu_yield import yields_to_urgent
from slurm_mm.agent.freeze_guard import FreezeGuard, FreezerCgroup
from slurm_mm.agent.job_record import LaunchRequest
from slurm_mm.agent.job_records import JobRecords
from slurm_mm.agent.staging import (fits, gpu_dump_dir, prepare_staging_root, root_only_dir, tree_gpu_bytes,
                                    tree_resident_bytes)
from slurm_mm.config import Config
from slurm_mm.engine import filestate, gpu_inventory
from slurm_mm.engine.checkpoint import GpuCheckpointing, checkpoint_tree
from slurm_mm.engine.criu import Criu
from slurm_mm.engine.launcher import LaunchedTree, launch
from slurm_mm.engine.owner import Owner
from slurm_mm.engine.proctree import tree_pids
from slurm_mm.engine.restore import RestoredTree, restore_tree
from slurm_mm.errors import GpuError, NodeIncompatible
from slurm_mm.store import Image, ImageStore, Progress

log = logging.getLogger(__name__)

Tree = LaunchedTree | RestoredTree


class ProcessTree(Protocol):
    """What the agent does with a job's tree, launched or restored."""

    init_pid: int

    def wait(self, timeout: float | None = None) -> int: ...
    def poll(self) -> int | None: ...
    def signal(self, sig: int) -> None: ...
    def kill(self) -> None: ...


def open_store(cfg: Config, root: Path | None = None) -> ImageStore:
    """The image store the configuration describes (`root`: another job directory's parent)."""
    return ImageStore(root or cfg.checkpoint_root, level=cfg.compression_level,
                      threads=cfg.compression_threads, keep=cfg.keep_images, lock_timeout=cfg.timeouts.lock,
                      background_cpus=cfg.commit_background_cpus or None, read_back=cfg.commit_read_back)


def restorable(store: ImageStore, job_id: str, *, before_epoch: int | None,
               owner: Owner | None) -> Iterator[tuple[Image, str]]:
    """The job's images a run may restore, newest first, each with "" or why it may not.

    `before_epoch`: only images of earlier runs (a run never restores its own or a later
    run's image). `owner`: the image must be the job owner's. A root-owned image is never
    restorable: its application would run as root.
    """
    for image in store.images(job_id):
        m = image.manifest
        if before_epoch is not None and m.epoch >= before_epoch:
            yield image, f"its epoch {m.epoch} is not older than this run's {before_epoch}"
        elif m.uid == 0:
            yield image, "it belongs to uid 0: a root-run restore never recreates a root-owned application"
        elif owner is not None and (m.uid, m.gid) != (owner.uid, owner.gid):
            yield image, f"its recorded owner {m.uid}:{m.gid} is not the job's {owner.uid}:{owner.gid}"
        else:
            yield image, ""


def image_pins(extra: object) -> set[str]:
    """The pin directories an image's manifest names: its batch tree's (`files.pins`) and
    each of its step tasks' (`steps.<token>.files.<rank>.pins`); retention keeps them."""
    found: set[str] = set()
    if not isinstance(extra, dict):
        return found
    summaries = [extra.get("files")]
    for meta in (extra.get("steps") or {}).values() if isinstance(extra.get("steps"), dict) else ():
        if isinstance(meta, dict) and isinstance(meta.get("files"), dict):
            summaries.extend(meta["files"].values())
    for summary in summaries:
        pins = summary.get("pins") if isinstance(summary, dict) else None
        if isinstance(pins, str):
            found.add(pins)
    return found


@dataclass
class Dumped:
    """A dump in staging, and what the store's manifest records about it."""

    staging: Path
    gpu_inventory: dict[str, Any] | None
    criu_version: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RestoreTarget:
    """Who and where a restored tree runs: its owner, its stdio and its cgroups."""

    owner: Owner
    stdio: list[int | None]
    cgroup_procs: list[Path] = field(default_factory=list)

    @classmethod
    def of(cls, req: LaunchRequest) -> RestoreTarget:
        return cls(req.owner, list(req.stdio), list(req.cgroup_procs))


class JobCheckpointer:
    """Checkpoint and restore of jobs on this node, through one CRIU lock."""

    def __init__(self, cfg: Config, store: ImageStore, node: str,
                 gpu: GpuCheckpointing | None | bool = True) -> None:
        """`gpu`: the CUDA checkpointer (True: open it if this node has one; None: none)."""
        self.cfg = cfg
        self.store = store
        self.node = node
        self.criu = Criu(cfg.criu_path, libexec=cfg.libexec_dir, timeout=cfg.timeouts.checkpoint)
        self.criu_version = self.criu.version()
        if gpu is True:
            from slurm_mm.engine.gpu import open_checkpointer  # noqa: PLC0415 - pulls in the CUDA side

            gpu = open_checkpointer()
        self.gpu: GpuCheckpointing | None = gpu or None
        # One CRIU run at a time on a node: CRIU makes fixed-name work directories in the
        # tree's root, so two dumps of PID-namespace-only trees collide (-EEXIST; seen in
        # benchmarks: 4 of 40 concurrent dumps failed). Commits still run in parallel.
        self.criu_lock = CriuGate()  # stopping dumps first
        mode = cfg.job_mount_namespace
        self.private_proc = mode == "always" or (mode == "auto" and self.gpu is not None)
        # The node agent's job records (agent/job_records.py): when set, every tree gets a
        # status file its mm-init writes the job's end to, read by a restarted agent.
        self.records: JobRecords | None = None

    def _status_fd(self, job_id: str | None, key: str = "") -> int | None:
        if self.records is None or job_id is None:
            return None
        try:
            return self.records.status_fd(job_id, key)
        except (OSError, ValueError) as exc:
            log.warning("job %s: no status file (%s): an agent restart would lose it", job_id, exc)
            return None

    # ------------------------------------------------------------ staging policy

    def check_staging(self) -> None:
        """Refuse (PermissionDenied/ConfigError) unless root alone can reach the staging dir."""
        prepare_staging_root(self.cfg.staging_dir)

    def staging(self, job_id: str, name: str, create: bool = True) -> Path:
        """A fresh root-only directory on node-local staging space (or its free name)."""
        return root_only_dir(self.cfg.staging_dir / job_id / name, create=create)

    def staging_beside(self, staging: Path, name: str) -> Path:
        """A fresh root-only directory next to `staging`, on its filesystem (a GPU job's
        staging is on tmpfs): what is made there joins `staging` by rename."""
        return root_only_dir(staging.parent / name)

    def dump_staging(self, job_id: str, name: str, pids: list[int]) -> tuple[Path, str]:
        """Node-local staging when the tree's memory fits there ("async": the store commits
        while the job runs on), else a root-only directory on the shared store ("direct")."""
        cfg = self.cfg
        gpu_bytes = tree_gpu_bytes(pids)
        needed = tree_resident_bytes(pids) + gpu_bytes
        cfg.staging_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if cfg.async_checkpoints and gpu_bytes:
            fast = gpu_dump_dir(cfg.gpu_staging_dir, job_id, name, needed, gpu_bytes, cfg.staging_min_free_ratio)
            if fast is not None:
                return fast, "async"
        if cfg.async_checkpoints and fits(cfg.staging_dir, needed, cfg.staging_min_free_ratio):
            return self.staging(job_id, name), "async"
        log.warning("job %s: %d MiB do not fit in %s: dumping to the shared filesystem",
                    job_id, needed >> 20, cfg.staging_dir)
        return root_only_dir(Path(self.store.root) / ".staging" / self.node / job_id / name), "direct"

    def restore_staging(self, job_id: str, image: Image) -> Path:
        """Where to extract an image (its free name): tmpfs for a GPU job's image when it
        fits there and in RAM beside the restored tree (as large again)."""
        name = f"restore-{image.seq}"
        size = image.manifest.total_size
        if image.manifest.gpu:
            fast = gpu_dump_dir(self.cfg.gpu_staging_dir, job_id, name, size, size,
                                self.cfg.staging_min_free_ratio, create=False)
            if fast is not None:
                return fast
        return self.staging(job_id, name, create=False)

    def pin_root(self, job_id: str) -> Path:
        """Where dumps pin the job's shared files (the store's job directory: same filesystem)."""
        return Path(self.store.root) / job_id / ".pins"

    # ------------------------------------------------------------ launch

    def launch(self, req: LaunchRequest, *, record_end: bool = False, status_key: str = "") -> LaunchedTree:
        """`record_end`: the tree's end goes to the job's status file (job records), or
        with `status_key` to that of one of its step tasks."""
        status_fd = self._status_fd(req.job.job_id, status_key) if record_end else None
        try:
            return launch(req.argv, uid=req.uid, gid=req.gid, groups=req.groups, env=req.env,
                          cwd=req.cwd, stdin=req.stdio[0], stdout=req.stdio[1], stderr=req.stdio[2],
                          join_cgroups=[str(p) for p in req.cgroup_procs], libexec=self.cfg.libexec_dir,
                          private_proc=self.private_proc, status_fd=status_fd)
        finally:
            if status_fd is not None:
                os.close(status_fd)

    # ------------------------------------------------------------ checkpoint

    def file_spec(self, job_id: str, owner: Owner, *, env: dict[str, str], script: str,
                  pin_name: str) -> filestate.CaptureSpec:
        """What a dump of this job records of its files (engine.filestate): node-local
        paths are the site's, the job's $TMPDIR, and slurmd's spool dir of its script;
        closed files count in $TMPDIR and node-local working directories (scratch_files)."""
        local = list(self.cfg.node_local_paths)
        tmpdir = env.get("TMPDIR", "")
        scratch = []
        if tmpdir.startswith("/") and ".." not in tmpdir.split("/"):
            local.append(tmpdir)
            scratch.append(tmpdir)  # walked only if the owner owns it (a per-job $TMPDIR, not /tmp)
        if os.path.basename(script) == "slurm_script":  # <SlurmdSpoolDir>/jobNNNNN/slurm_script
            local.append(os.path.dirname(os.path.dirname(script)))
        return filestate.CaptureSpec(init_pid=0, images_dir="", node=self.node, owner_uid=owner.uid,
                                     owner_gids=list(owner.groups), node_local=local,
                                     budget=self.cfg.file_state_budget,
                                     pin_root=str(self.pin_root(job_id)), pin_name=pin_name,
                                     scratch=scratch)

    def dump(self, init_pid: int, staging: Path, *, leave_running: bool,
             files: filestate.CaptureSpec | None = None, deadline: float | None = None,
             leave_stopped: bool = False) -> Dumped:
        """CRIU (and the GPU's state) of the tree into `staging`; stopping dumps go first.
        `deadline`: wall-clock time by which a hung criu is killed (a preempted job's grace end).
        `leave_stopped`: the tree stays SIGSTOPped after the dump (not a stopping dump: the
        caller resumes it)."""
        leave_running = leave_running and not leave_stopped
        keeps_tree = leave_running or leave_stopped
        kind = "a stopping dump" if not keeps_tree else "an ordinary dump"
        with self.criu_lock.hold(urgent=not keeps_tree, what=f"{kind} of pid {init_pid}"):
            timeout = dump_deadline.timeout(deadline, self.cfg.timeouts.checkpoint)
            # An ordinary dump gives way to a stopping one that waits (agent/criu_yield.py).
            watch = yields_to_urgent(self.criu_lock, self.criu.binary, init_pid) if keeps_tree else nullcontext()
            with watch:
                result = checkpoint_tree(init_pid, staging, leave_running=leave_running, gpu=self.gpu,
                                         criu=self.criu, timeout=timeout, files=files,
                                         leave_stopped=leave_stopped)
        inventory = None
        if result.gpu_pids:
            found = gpu_inventory.read_inventory()
            inventory = found.to_dict() if found else None
        return Dumped(staging, inventory, result.criu_version,
                      {"timings": result.timings, "image_bytes": result.image_bytes,
                       "gpu_pids": result.gpu_pids, "files": result.files})

    def commit(self, job_id: str, dumped: Dumped, *, epoch: int, owner: Owner, trigger: str,
               progress: Progress | None = None, cpus: frozenset[int] | None = None) -> Image:
        """The dump as the job's newest durable image; then retention and unused pins go.
        cpus: where a periodic commit's threads run (None: anywhere)."""
        image = self.store.commit(job_id, dumped.staging, epoch=epoch, uid=owner.uid, gid=owner.gid,
                                  node=self.node, trigger=trigger, gpu=dumped.gpu_inventory,
                                  criu_version=dumped.criu_version, extra=dumped.extra, progress=progress,
                                  cpus=cpus)
        self.store.gc(job_id)
        filestate.prune_pins(self.pin_root(job_id), {pin for img in self.store.images(job_id)
                                                     for pin in image_pins(img.manifest.extra)})
        return image

    def hurry(self, job_id: str) -> None:
        """An urgent checkpoint waits for the job's periodic commit: lift that to normal priority."""
        self.store.hurry(job_id)

    # ------------------------------------------------------------ restore

    def restorable(self, job_id: str, *, before_epoch: int | None,
                   owner: Owner | None) -> Iterator[tuple[Image, str]]:
        return restorable(self.store, job_id, before_epoch=before_epoch, owner=owner)

    def restore_image(self, job_id: str, image: Image, target: Callable[[Path], RestoreTarget] | RestoreTarget,
                      *, files: bool = True, progress: Progress | None = None,
                      on_phase: Callable[[str], None] = lambda phase: None,
                      after: Callable[[RestoredTree, Path], None] | None = None) -> RestoredTree:
        """Extract `image` into staging (checked while read) and restore it; the staging
        copy goes afterwards. `target`: or a function of the extracted image's directory.
        `after`: runs with the restored tree while the extracted image still exists."""
        staging = self.restore_staging(job_id, image)
        try:
            on_phase("extracting")
            self.store.extract(image, staging, progress=progress)
            on_phase("restoring")
            where = target(staging) if callable(target) else target
            tree = self.restore(staging, where, image.manifest.gpu,
                                pin_root=self.pin_root(job_id) if files else None, job_id=job_id)
            if after is not None:
                after(tree, staging)
            return tree
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def restore(self, images: Path, target: RestoreTarget, gpu: dict[str, Any] | None, *,
                pin_root: Path | None, job_id: str | None = None, status_key: str = "") -> RestoredTree:
        """Restore an extracted image. `gpu`: the GPU inventory recorded with it (None: no
        GPU state). `job_id`: with job records, the tree's end goes to its status file. The job's files are brought back to the image's record first
        (FileStateRefused names any that cannot be)."""
        options: dict[str, Any] = {}
        if gpu:
            if self.gpu is None:
                raise NodeIncompatible("the image holds GPU state, but this node has no CUDA checkpoint support")
            here = gpu_inventory.check_compatible(gpu)
            if here is not None:
                options["gpu_pairs"] = gpu_inventory.gpu_pairs(gpu, here)
        owner = target.owner
        prepared = filestate.prepare(images, node=self.node, uid=owner.uid, gids=list(owner.groups),
                                     pin_root=pin_root, work=images / ".handed")
        status_fd = self._status_fd(job_id, status_key)
        try:
            with self.criu_lock.hold(what=f"a restore of job {job_id}" if job_id else f"a restore of {images}"):
                tree = restore_tree(images, stdin=target.stdio[0], stdout=target.stdio[1],
                                    stderr=target.stdio[2], join_cgroups=[str(p) for p in target.cgroup_procs],
                                    owner_uid=owner.uid, owner_gids=list(owner.groups),
                                    gpu=self.gpu if gpu else None, gpu_resume_options=options, criu=self.criu,
                                    timeout=self.cfg.timeouts.restore, extra_inherit=prepared.inherit,
                                    libexec=self.cfg.libexec_dir, status_fd=status_fd)
        finally:
            prepared.close()
            if status_fd is not None:
                os.close(status_fd)
        tree.files_report = prepared.report
        return tree

    # ------------------------------------------------------------ SUSPEND

    def suspend_gpu(self, init_pid: int, cgroup_procs: list[Path]) -> list[int]:
        """SUSPEND preemption: GPU memory to host before Slurm's freezer stops the tree (the
        freeze is held off until then: the driver hangs on frozen processes). The PIDs
        whose GPU state moved out, for resume_gpu()."""
        if self.gpu is None:
            return []
        with FreezeGuard(FreezerCgroup.of(cgroup_procs)):
            try:
                return self.gpu.suspend(tree_pids(init_pid))
            except GpuError as exc:
                log.error("GPU suspend of pid %d failed: %s", init_pid, exc)
                return []

    def resume_gpu(self, pids: list[int]) -> list[int]:
        """GPU state back after SIGCONT; the PIDs still suspended (all of them on failure)."""
        if self.gpu is None or not pids:
            return []
        try:
            self.gpu.resume(pids)
            return []
        except GpuError as exc:
            log.error("GPU resume of %s failed: %s", pids, exc)
            return pids
