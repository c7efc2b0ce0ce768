"""`slurm-mm checkpoint --pid PID --to DIR` and `slurm-mm restore DIR`: checkpoint/restore
of one process tree without Slurm (the interface for admins and benchmarks).

DIR is a job directory of the image store: its parent is the store's root and its name
the image's job id (any name the store accepts as one: `1234`, `myjob`, `run_7`). The
engine does the process work (CRIU, the CUDA API), the store the files; this module
only checks what the caller typed and composes the two.

Runs as root. What it trusts: the PID and DIR given by root, /proc, the configuration
file. What it checks before it touches a process: that PID is the namespace init of a
tree started by mm-init (PID 1 of its own PID namespace, a session leader, named
mm-init, with an application child), that the application does not run as root, and
that DIR is not a symlink and is accepted by the store (prepare_job). What it must never
do: restore an image whose owner is root (the application would run as root), drop the
only copy of a stopped tree's image (if the store refuses it, it stays in staging and
the error says where), or print a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from slurm_mm import config
from slurm_mm.cli.image_cmds import open_store, require_root
from slurm_mm.engine import proctree
from slurm_mm.engine.checkpoint import checkpoint_tree
from slurm_mm.engine.criu import Criu
from slurm_mm.engine.restore import RestoredTree, read_metadata, restore_tree
from slurm_mm.errors import (
    CheckpointFailed,
    ConfigError,
    ImageRefused,
    NodeIncompatible,
    NoImage,
    SlurmMMError,
    StaleEpoch,
    UnsafePath,
    UsageError,
)
from slurm_mm.store import Skipped
from slurm_mm.store.safe_fs import name_problem

log = logging.getLogger(__name__)

MM_INIT_COMM = "mm-init"
# Signals a foreground `slurm-mm restore` passes on to the restored tree: the tree has
# its own session, so the terminal's Ctrl-C reaches only this command.
FORWARDED_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM,
                     signal.SIGUSR1, signal.SIGUSR2)
_STORE_LOGGER = "slurm_mm.store.image_store"
_KEPT = "the tree was stopped by the dump and its CRIU image is kept in {}"
EPOCH = 0  # no Slurm run count here; a job directory whose fence is higher is refused


# ---------------------------------------------------------------------------- the tree

@dataclass(frozen=True)
class TreeInit:
    """The namespace init of a tree started by mm-init, and who its application runs as."""

    pid: int  # host PID of the namespace init (what CRIU dumps)
    app_pid: int  # host PID of the application (namespace PID 2, normally)
    uid: int
    gid: int


def _read_proc(pid: int, name: str) -> str | None:
    try:
        with open(f"/proc/{pid}/{name}", encoding="utf-8", errors="replace") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _session_id(pid: int) -> int | None:
    text = _read_proc(pid, "stat")
    if text is None:
        return None
    # After the last ')' (comm may hold anything): state ppid pgrp session ...
    fields = text[text.rfind(")") + 2:].split()
    try:
        return int(fields[3])
    except (IndexError, ValueError):
        return None


def find_tree_init(pid: int) -> TreeInit:
    """Check that `pid` is the init of a tree mm-init started; UsageError naming it if not."""
    if pid <= 0:
        raise UsageError(f"--pid {pid} is not a process id")
    if not proctree.alive(pid):
        raise UsageError(f"pid {pid}: no such process")
    ids = proctree.task_ids(pid)
    if ids is None:
        raise UsageError(f"pid {pid}: no such process")
    if ids.ns_pid != 1 or pid == 1:
        raise UsageError(f"pid {pid} is not the init of a job tree: it is not PID 1 of its own PID "
                         "namespace (give the host PID of the mm-init that runs the tree)")
    if _session_id(pid) != pid:
        raise UsageError(f"pid {pid} is not the init of a job tree: it is not a session leader")
    comm = (_read_proc(pid, "comm") or "").strip()
    if comm != MM_INIT_COMM:
        raise UsageError(f"pid {pid} is not the init of a job tree: it runs {comm!r}, not {MM_INIT_COMM}")
    kids = [k for k in proctree.children(pid) if proctree.alive(k)]
    apps = sorted((proctree.task_ids(k) for k in kids), key=lambda t: t.ns_pid if t else sys.maxsize)
    app = apps[0] if apps else None
    if app is None:
        raise UsageError(f"pid {pid} has no application process left to checkpoint")
    if app.uids[0] == 0:
        raise UsageError(f"pid {pid}: its application (pid {app.pid}) runs as root; slurm-mm never "
                         "restores a root-owned application, so it does not checkpoint one")
    return TreeInit(pid=pid, app_pid=app.pid, uid=app.uids[0], gid=app.gids[0])


# ---------------------------------------------------------------------------- paths

def job_dir(text: str, *, must_exist: bool) -> tuple[Path, str]:
    """(store root, job id) of a job directory path typed by the caller."""
    path = Path(text)
    if ".." in path.parts:
        raise UsageError(f"'{text}' must not contain '..'")
    path = path.absolute()
    if not path.name:
        raise UsageError(f"'{text}' is not a job directory")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise UnsafePath(f"{path} is a symlink; give the real directory")
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path} is not a directory")
    if st is None and must_exist:
        raise NoImage(f"{path} does not exist")
    problem = name_problem(path.name, kind="job id")
    if problem:
        raise UsageError(f"{path}: the directory's name is the images' job id, and {problem}")
    return path.parent, path.name


def staging_dir(cfg: config.Config, prefix: str) -> Path:
    """A fresh root-only directory under the configured staging space."""
    base = cfg.staging_dir
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(base)
    except OSError as exc:
        raise ConfigError(f"staging_dir {base}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafePath(f"staging_dir {base} must be a root-owned directory that only root can write")
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def _criu(cfg: config.Config, timeout: float) -> Criu:
    return Criu(cfg.criu_path, libexec=cfg.libexec_dir, timeout=timeout)


def _open_gpu():
    from slurm_mm.engine.gpu import open_checkpointer  # noqa: PLC0415 - pulls in the CUDA side

    return open_checkpointer()


# ---------------------------------------------------------------------------- progress

def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


class ProgressLine:
    """A store Progress callback that redraws `label: done/total (rate)` on a terminal.

    Silent when the stream is not a terminal (logs, pipes, tests). A restart at 0 bytes
    (the store falling back to an older image) keeps the previous line and starts anew.
    """

    def __init__(self, label: str, stream: TextIO | None = None, interval: float = 0.1) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.interval = interval
        try:
            self.enabled = self.stream.isatty()
        except (AttributeError, ValueError):
            self.enabled = False
        self._started = self._drawn = 0.0
        self._open = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done == 0:
            self.close()
            self._started = now
        elif done < total and now - self._drawn < self.interval:
            return
        self._drawn = now
        rate = done / max(now - self._started, 1e-6)
        self.stream.write(f"\r{self.label}: {human_bytes(done)} / {human_bytes(total)}, "
                          f"{human_bytes(rate)}/s\x1b[K")
        self.stream.flush()
        self._open = True

    def close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False

    def __enter__(self) -> ProgressLine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _QuietStoreSkips:
    """The store logs each image it skips; restore reports them itself, after the progress line."""

    def __enter__(self) -> None:
        self.logger = logging.getLogger(_STORE_LOGGER)
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self.logger.setLevel(self.level)


# ---------------------------------------------------------------------------- checkpoint

def checkpoint_pid(args: argparse.Namespace) -> int:
    """slurm-mm checkpoint --pid PID --to DIR [--leave-running]."""
    if args.job_id is not None:
        raise UsageError("give a job id or --pid, not both")
    if getattr(args, "requeue", False):
        raise UsageError("--requeue is for Slurm jobs; with --pid the tree stops unless --leave-running")
    if not args.to:
        raise UsageError("--pid needs --to DIR (the job directory to write the image into)")
    require_root("slurm-mm checkpoint --pid")
    cfg = config.load()
    root, job = job_dir(args.to, must_exist=False)
    tree = find_tree_init(args.pid)
    store = open_store(cfg, root)
    # Every store-side refusal (unsafe root, DIR owned by another user) comes now, while
    # the tree is untouched.
    store.prepare_job(job, tree.uid, tree.gid)
    try:
        store.advance_epoch(job, EPOCH)
    except StaleEpoch as exc:
        raise StaleEpoch(f"{exc}: {root / job} holds images of a Slurm job's later runs; "
                         "use another directory") from None
    criu = _criu(cfg, cfg.timeouts.checkpoint)
    gpu = _open_gpu()
    staging = staging_dir(cfg, f"dump-{tree.pid}-")
    dumped = committed = False
    try:
        result = checkpoint_tree(tree.pid, staging, leave_running=args.leave_running, gpu=gpu,
                                 criu=criu, timeout=cfg.timeouts.checkpoint)
        dumped = True
        inventory = None
        if result.gpu_pids:
            from slurm_mm.engine import gpu_inventory  # noqa: PLC0415

            found = gpu_inventory.read_inventory()
            inventory = found.to_dict() if found else None
        started = time.monotonic()
        with ProgressLine("slurm-mm: storing image") as progress:
            image = store.commit(
                job, staging, epoch=EPOCH, uid=tree.uid, gid=tree.gid, node=socket.gethostname(),
                trigger="manual", gpu=inventory, criu_version=result.criu_version,
                extra={"timings": result.timings, "image_bytes": result.image_bytes,
                       "gpu_pids": result.gpu_pids, "pid": tree.pid, "leave_running": args.leave_running},
                progress=progress)
        store_s = time.monotonic() - started
        committed = True
    except SlurmMMError as exc:
        if isinstance(exc, CheckpointFailed) and exc.log_excerpt:
            log.info("CRIU's log:\n%s", exc.log_excerpt)
        if dumped and not args.leave_running:
            exc.args = (f"{exc}; {_KEPT.format(staging)}",)
        raise
    finally:
        if dumped and not committed and not args.leave_running:
            # The dump ended the tree: this directory is all that is left of it.
            if not isinstance(sys.exc_info()[1], SlurmMMError):
                print(f"slurm-mm: {_KEPT.format(staging)}", file=sys.stderr)
        else:
            shutil.rmtree(staging, ignore_errors=True)
    m = image.manifest
    t = result.timings
    fate = "left running" if args.leave_running else "stopped"
    print(f"{image.path}: {human_bytes(m.total_size)} ({human_bytes(m.stored_size)} stored), "
          f"dump {t.get('dump', 0):.2f} s, store {store_s:.2f} s, "
          f"total {t.get('total', 0) + store_s:.2f} s; tree {tree.pid} {fate}")
    return 0


# ---------------------------------------------------------------------------- restore

def _owner_gids(uid: int, gid: int) -> list[int]:
    """Groups the restored application may hold: the manifest's gid and the owner's groups."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return [gid]
    return sorted(set(os.getgrouplist(name, gid)) | {gid})


def _gpu_for(manifest) -> tuple[Any, dict[str, Any]]:
    if not manifest.gpu:
        return None, {}
    from slurm_mm.engine import gpu_inventory  # noqa: PLC0415

    gpu = _open_gpu()
    if gpu is None:
        raise NodeIncompatible("the image holds GPU state, but this node has no CUDA checkpoint support")
    here = gpu_inventory.check_compatible(manifest.gpu)
    return gpu, ({"gpu_pairs": gpu_inventory.gpu_pairs(manifest.gpu, here)} if here is not None else {})


def _report_skipped(skipped: list[Skipped]) -> None:
    for s in skipped:
        print(f"slurm-mm: skipping {s.path.name}: {s.reason}", file=sys.stderr)


def _stdio_fds(images: Path) -> dict[int, int]:
    """Our stdin (/dev/null), stdout and stderr for the job's recorded 0, 1, 2.

    Duplicated above 2: criu runs with its own stdout/stderr, so fds 1 and 2 handed to it
    as themselves would be criu's pipes, not ours.
    """
    recorded = read_metadata(images).get("stdio", {})
    fds: dict[int, int] = {}
    if "0" in recorded:
        fds[0] = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    for n in (1, 2):
        if str(n) in recorded:
            try:
                fds[n] = os.dup(n)
            except OSError:
                pass  # closed here: the job keeps the file it had
    return fds


def _wait(tree: RestoredTree) -> int:
    def forward(signum: int, _frame: object) -> None:
        tree.signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        return tree.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def restore_dir(args: argparse.Namespace) -> int:
    """slurm-mm restore DIR [--detach]."""
    require_root("slurm-mm restore")
    cfg = config.load()
    root, job = job_dir(str(args.dir), must_exist=True)
    store = open_store(cfg, root)
    staging = staging_dir(cfg, "restore-")
    fds: dict[int, int] = {}
    try:
        images = staging / "image"
        skipped: list[Skipped] = []
        try:
            with _QuietStoreSkips(), ProgressLine("slurm-mm: extracting image") as progress:
                image = store.extract_latest(job, images, progress=progress, skipped=skipped)
        finally:
            _report_skipped(skipped)
        if skipped:
            print(f"slurm-mm: restoring {image.path.name}, the newest image that verifies", file=sys.stderr)
        m = image.manifest
        if m.uid == 0:
            raise ImageRefused(f"{image.path} belongs to uid 0: a root-run restore never recreates a "
                               "root-owned application")
        gpu, gpu_options = _gpu_for(m)
        fds = _stdio_fds(images)
        try:
            tree = restore_tree(images, stdin=fds.get(0), stdout=fds.get(1), stderr=fds.get(2),
                                owner_uid=m.uid, owner_gids=_owner_gids(m.uid, m.gid), gpu=gpu,
                                gpu_resume_options=gpu_options, criu=_criu(cfg, cfg.timeouts.restore),
                                timeout=cfg.timeouts.restore)
        except CheckpointFailed as exc:  # RestoreFailed and NodeIncompatible
            if exc.log_excerpt:
                log.info("CRIU's log:\n%s", exc.log_excerpt)
            raise
    finally:
        for fd in fds.values():
            os.close(fd)
        # CRIU has read the image into the restored processes; the copy is not needed.
        shutil.rmtree(staging, ignore_errors=True)
    log.info("restored %s as pid %d", image.path, tree.init_pid)
    if args.detach:
        print(tree.init_pid)
        return 0
    return _wait(tree)
