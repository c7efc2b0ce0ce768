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
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from slurm_mm import config
from slurm_mm.checkpointer import JobCheckpointer, RestoreTarget, open_store
from slurm_mm.cli.common import job_dir, require_root
from slurm_mm.engine import proctree
from slurm_mm.engine.owner import Owner
from slurm_mm.engine.restore import RestoredTree, read_metadata
from slurm_mm.errors import (CheckpointFailed, ImageCorrupt, ImageRefused, NoImage, RestoreFailed, SlurmMMError,
                             StaleEpoch, UnsafePath, UsageError)
from slurm_mm.store import Image, Trigger

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

def _checkpointer(cfg: config.Config, root: Path) -> JobCheckpointer:
    checkpointer = JobCheckpointer(cfg, open_store(cfg, root), socket.gethostname())
    checkpointer.check_staging()
    return checkpointer


def _drop_job_staging(cfg: config.Config, job: str) -> None:
    """The job's (now empty) directory under the staging space goes with its last use."""
    try:
        os.rmdir(cfg.staging_dir / job)
    except OSError:
        pass


def _app_context(app_pid: int) -> tuple[dict[str, str], str]:
    """The application's $TMPDIR (as a node-local path for its files) and its argv[0]."""
    env: dict[str, str] = {}
    text = _read_proc(app_pid, "environ") or ""
    for item in text.split("\0"):
        if item.startswith("TMPDIR="):
            env["TMPDIR"] = item[len("TMPDIR="):]
    argv = (_read_proc(app_pid, "cmdline") or "").split("\0")
    return env, argv[0]


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
    checkpointer = _checkpointer(cfg, root)
    store = checkpointer.store
    # Every store-side refusal (unsafe root, DIR owned by another user) comes now, while
    # the tree is untouched.
    store.prepare_job(job, tree.uid, tree.gid)
    try:
        store.advance_epoch(job, EPOCH)
    except StaleEpoch as exc:
        raise StaleEpoch(f"{exc}: {root / job} holds images of a Slurm job's later runs; "
                         "use another directory") from None
    owner = Owner.of(tree.uid, tree.gid)
    staging, _mode = checkpointer.dump_staging(job, f"dump-{tree.pid}-{int(time.time() * 1000)}",
                                               proctree.tree_pids(tree.pid))
    env, script = _app_context(tree.app_pid)
    files = checkpointer.file_spec(job, owner, env=env, script=script, pin_name=staging.name)
    dumped = committed = False
    try:
        result = checkpointer.dump(tree.pid, staging, leave_running=args.leave_running, files=files)
        dumped = True
        result.extra.update(pid=tree.pid, leave_running=args.leave_running)
        started = time.monotonic()
        with ProgressLine("slurm-mm: storing image") as progress:
            image = checkpointer.commit(job, result, epoch=EPOCH, owner=owner, trigger=Trigger.MANUAL,
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
            _drop_job_staging(cfg, job)
    m = image.manifest
    t = result.extra["timings"]
    fate = "left running" if args.leave_running else "stopped"
    print(f"{image.path}: {human_bytes(m.total_size)} ({human_bytes(m.stored_size)} stored), "
          f"dump {t.get('dump', 0):.2f} s, store {store_s:.2f} s, "
          f"total {t.get('total', 0) + store_s:.2f} s; tree {tree.pid} {fate}")
    for note in result.extra.get("files", {}).get("notes", []):
        print(f"slurm-mm: {note}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- restore

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


def _restore_one(checkpointer: JobCheckpointer, job: str, image: Image) -> RestoredTree:
    m = image.manifest
    fds: dict[int, int] = {}

    def target(images: Path) -> RestoreTarget:
        fds.update(_stdio_fds(images))
        return RestoreTarget(Owner.of(m.uid, m.gid), [fds.get(0), fds.get(1), fds.get(2)])

    try:
        with ProgressLine("slurm-mm: extracting image") as progress:
            return checkpointer.restore_image(job, image, target, progress=progress)
    except RestoreFailed as exc:  # and NodeIncompatible: CRIU's log excerpt first
        if exc.log_excerpt:
            log.info("CRIU's log:\n%s", exc.log_excerpt)
        raise
    finally:
        for fd in fds.values():
            os.close(fd)


def restore_dir(args: argparse.Namespace) -> int:
    """slurm-mm restore DIR [--detach]: the newest image that verifies, older ones after
    a damaged one; never a root-owned one."""
    require_root("slurm-mm restore")
    cfg = config.load()
    root, job = job_dir(str(args.dir), must_exist=True)
    checkpointer = _checkpointer(cfg, root)
    skipped = 0
    try:
        with _QuietStoreSkips():
            candidates = list(checkpointer.restorable(job, before_epoch=None, owner=None))
        for image, refusal in candidates:
            if refusal:
                raise ImageRefused(f"{image.path}: {refusal}")
            if skipped:
                print(f"slurm-mm: restoring {image.path.name}, the newest image that verifies", file=sys.stderr)
            try:
                tree = _restore_one(checkpointer, job, image)
                break
            except (ImageCorrupt, UnsafePath) as exc:
                print(f"slurm-mm: skipping {image.path.name}: {exc}", file=sys.stderr)
                skipped += 1
        else:
            raise NoImage(f"job {job}: no complete, verified image in {root / job}")
    finally:
        _drop_job_staging(cfg, job)
    log.info("restored %s as pid %d", image.path, tree.init_pid)
    if args.detach:
        print(tree.init_pid)
        return 0
    return _wait(tree)
