"""The engine as the node agent uses it: a job's launch request in, a process tree out.

Adapts the engine's process-level API (launcher, checkpoint_tree, restore_tree, the GPU
checkpointer) to LaunchRequests and manifests; knows no Slurm and no image layout.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slurm_mm.agent import dump_deadline
from slurm_mm.agent.criu_gate import CriuGate
from slurm_mm.agent.freeze_guard import FreezeGuard, FreezerCgroup
from slurm_mm.config import Config
from slurm_mm.engine import filestate, gpu_inventory
from slurm_mm.engine.checkpoint import checkpoint_tree
from slurm_mm.engine.criu import Criu
from slurm_mm.engine.gpu import open_checkpointer
from slurm_mm.engine.launcher import launch
from slurm_mm.engine.restore import restore_tree
from slurm_mm.errors import GpuError

log = logging.getLogger(__name__)


@dataclass
class Dumped:
    """What a dump tells the store's manifest."""

    gpu_inventory: dict[str, Any] | None
    extra: dict[str, Any] = field(default_factory=dict)


class JobEngine:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.criu = Criu(cfg.criu_path, libexec=cfg.libexec_dir, timeout=cfg.timeouts.checkpoint)
        self.criu_version = self.criu.version()
        self.gpu = open_checkpointer()  # None on nodes without the CUDA checkpoint API
        # One CRIU run at a time on a node: CRIU makes fixed-name work directories in the
        # tree's root, so two dumps of PID-namespace-only trees collide (-EEXIST; seen in
        # benchmarks: 4 of 40 concurrent dumps failed). Commits still run in parallel.
        self.criu_lock = CriuGate()  # stopping dumps first (agent/criu_gate.py)
        mode = cfg.job_mount_namespace
        self.private_proc = mode == "always" or (mode == "auto" and self.gpu is not None)

    def launch(self, req) -> Any:
        return launch(req.argv, uid=req.uid, gid=req.gid, groups=req.groups, env=req.env,
                      cwd=req.cwd, stdin=req.stdio[0], stdout=req.stdio[1], stderr=req.stdio[2],
                      join_cgroups=[str(p) for p in req.cgroup_procs], libexec=self.cfg.libexec_dir,
                      private_proc=self.private_proc)

    def restore(self, images: Path, req, gpu: dict[str, Any] | None, *, node: str,
                pin_root: Path | None) -> Any:
        """`gpu`: the GPU inventory recorded with the image (None: no GPU state in it).
        The job's files are brought back to the image's record first (FileStateRefused
        names any that cannot be)."""
        options: dict[str, Any] = {}
        if gpu:
            here = gpu_inventory.check_compatible(gpu)
            if here is not None:
                options["gpu_pairs"] = gpu_inventory.gpu_pairs(gpu, here)
        files = filestate.prepare(images, node=node, uid=req.uid, gids=req.groups, pin_root=pin_root,
                                  work=images / ".handed")
        try:
            with self.criu_lock.hold():
                tree = restore_tree(images, stdin=req.stdio[0], stdout=req.stdio[1], stderr=req.stdio[2],
                                    join_cgroups=[str(p) for p in req.cgroup_procs], owner_uid=req.uid,
                                    owner_gids=req.groups, gpu=self.gpu if gpu else None,
                                    gpu_resume_options=options, criu=self.criu,
                                    timeout=self.cfg.timeouts.restore, extra_inherit=files.inherit,
                                    libexec=self.cfg.libexec_dir)
        finally:
            files.close()
        tree.files_report = files.report
        return tree

    def file_spec(self, req, *, node: str, pin_root: Path | None, pin_name: str) -> filestate.CaptureSpec:
        """What a dump of this job records of its files (engine.filestate)."""
        local = list(self.cfg.node_local_paths)
        tmpdir = req.env.get("TMPDIR", "")
        if tmpdir.startswith("/") and ".." not in tmpdir.split("/"):
            local.append(tmpdir)
        script = req.argv[0]
        if os.path.basename(script) == "slurm_script":  # <SlurmdSpoolDir>/jobNNNNN/slurm_script
            local.append(os.path.dirname(os.path.dirname(script)))
        return filestate.CaptureSpec(init_pid=0, images_dir="", node=node, owner_uid=req.uid,
                                     owner_gids=list(req.groups), node_local=local,
                                     budget=self.cfg.file_state_budget,
                                     pin_root=str(pin_root) if pin_root else None, pin_name=pin_name)

    def dump(self, tree: Any, images: Path, *, leave_running: bool,
             files: filestate.CaptureSpec | None = None) -> Dumped:
        with self.criu_lock.hold(urgent=not leave_running):
            result = checkpoint_tree(tree.init_pid, images, leave_running=leave_running, gpu=self.gpu,
                                     criu=self.criu, files=files,
                                     timeout=dump_deadline.timeout(tree, self.cfg.timeouts.checkpoint))
        inventory = None
        if result.gpu_pids:
            found = gpu_inventory.read_inventory()
            inventory = found.to_dict() if found else None
        return Dumped(inventory, {"timings": result.timings, "image_bytes": result.image_bytes,
                                  "gpu_pids": result.gpu_pids, "files": result.files})

    def suspend_gpu(self, tree: Any, cgroup_procs: list[Path]) -> None:
        """SUSPEND preemption: GPU memory to host before Slurm's freezer stops the tree
        (the freeze is held off until then: the driver hangs on frozen processes)."""
        if self.gpu is None or tree is None:
            return
        from slurm_mm.engine.proctree import tree_pids  # noqa: PLC0415

        with FreezeGuard(FreezerCgroup.of(cgroup_procs)):
            try:
                tree.gpu_suspended = self.gpu.suspend(tree_pids(tree.init_pid))
            except GpuError as exc:
                log.error("GPU suspend of pid %d failed: %s", tree.init_pid, exc)

    def resume_gpu(self, tree: Any) -> None:
        pids = getattr(tree, "gpu_suspended", None)
        if self.gpu is None or not pids:
            return
        try:
            self.gpu.resume(pids)
            tree.gpu_suspended = []
        except GpuError as exc:
            log.error("GPU resume of pid %d failed: %s", tree.init_pid, exc)
