"""bench-app run as slurm_mm runs a job, and the checkpoint pipelines measured on it.

A Job is bench-app launched by slurm_mm's own launcher (engine.launcher: mm-init, a new
PID namespace, the app dropped to an unprivileged user), so both slurm_mm and the raw
tools act on the tree a real job has. The pipelines:

- async (slurm_mm): engine.checkpoint_tree() into node-local staging with the job left
  running; the store commit (compress, checksum, fsync, verify, rename) then runs in a
  background thread while the job computes. What the job feels is the dump only.
- serial (baseline): the same dump, straight into the shared directory, with the tree
  left STOPPED (criu --leave-stopped) until the store has committed it; then SIGCONT.
  That is a synchronous checkpoint that resumes only once the image is safe.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import raw
from app import App, BenchError
from slurm_mm.engine import launcher
from slurm_mm.engine.checkpoint import CheckpointResult, checkpoint_tree
from slurm_mm.engine.criu import Criu
from slurm_mm.engine.restore import RestoredTree, restore_tree
from slurm_mm.store import Image, ImageStore

OWNER = (65534, 65534)  # nobody:nogroup: the job's owner
CRIU = Criu()  # one instance, as a long-lived agent holds (its version is read once)


class Job:
    """bench-app with `mib` MiB of memory, launched by slurm_mm's launcher as OWNER
    (private_proc: in its own mount namespace with its own /proc, as on GPU nodes)."""

    def __init__(self, where: Path, mib: int, name: str, *, private_proc: bool = False,
                 **app_options: object) -> None:
        self.dir = where / name
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        os.chown(self.dir, *OWNER)
        self.app = App(mib, self.dir / "stats", **app_options)  # type: ignore[arg-type]
        self.tree: launcher.LaunchedTree | None = launcher.launch(
            self.app.argv, uid=OWNER[0], gid=OWNER[1], groups=[OWNER[1]], cwd=self.dir,
            private_proc=private_proc)
        self.restored: RestoredTree | None = None
        self.init_pid = self.tree.init_pid
        try:
            self.app.wait_ready(exited=self.poll)
        except BaseException:
            self.stop()
            raise

    def poll(self) -> int | None:
        if self.restored is not None:
            return self.restored.poll()
        return self.tree.poll() if self.tree else 0

    def stop(self) -> None:
        """Kill the tree (namespace init) and reap it."""
        try:
            os.kill(self.init_pid, 9)
        except ProcessLookupError:
            pass
        if self.restored is not None:
            self.restored.wait(timeout=30)
            self.restored = None
        elif self.tree is not None:
            self.tree.wait(timeout=30)
            self.tree = None

    def adopt(self, pid: int | None = None, restored: RestoredTree | None = None) -> None:
        """The job now lives on as a restored tree (raw restore: a pid; slurm_mm: a
        RestoredTree); wait until the app iterates again."""
        self.tree = None
        self.restored = restored
        self.init_pid = restored.init_pid if restored else pid  # type: ignore[assignment]
        if restored is None:
            self.restored = _RawRestored(self.init_pid)  # type: ignore[assignment]
        before = self.app.stats().iters
        deadline = time.monotonic() + 60
        while self.app.stats().iters <= before:
            if self.poll() is not None or time.monotonic() > deadline:
                raise BenchError("the restored app does not iterate")
            time.sleep(0.01)


class _RawRestored:
    """A tree restored by raw `criu restore --restore-sibling`: our child, by pid."""

    def __init__(self, pid: int) -> None:
        self.init_pid = pid
        self._code: int | None = None

    def poll(self) -> int | None:
        if self._code is None:
            pid, status = os.waitpid(self.init_pid, os.WNOHANG)
            if pid:
                self._code = launcher.exit_code(status)
        return self._code

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise BenchError(f"restored tree {self.init_pid} did not end")
            time.sleep(0.01)
        return self._code  # type: ignore[return-value]


def store_at(shared: Path, *, level: int = 3, keep: int = 1) -> ImageStore:
    return ImageStore(shared / "store", level=level, threads=0, keep=keep)


def commit(store: ImageStore, job_id: str, images: Path, epoch: int = 0) -> tuple[float, Image]:
    t0 = time.monotonic()
    image = store.commit(job_id, images, epoch=epoch, uid=OWNER[0], gid=OWNER[1], node=os.uname().nodename,
                         trigger="periodic", criu_version=CRIU.version())
    return time.monotonic() - t0, image


@dataclass
class Checkpoint:
    """One checkpoint of a job, as the job and the harness saw it."""

    t0_ns: int = 0
    resumed_ns: int = 0  # when the job could run again
    done_ns: int = 0  # when the image was committed
    dump_s: float = 0.0
    commit_s: float = 0.0
    image_bytes: int = 0
    stored_bytes: int = 0
    engine_timings: dict[str, float] = field(default_factory=dict)
    error: str = ""

    @property
    def blocked_s(self) -> float:
        return (self.resumed_ns - self.t0_ns) / 1e9

    @property
    def total_s(self) -> float:
        return (self.done_ns - self.t0_ns) / 1e9


def async_checkpoint(job: Job, staging: Path, store: ImageStore, job_id: str,
                     on_done: threading.Event | None = None,
                     dump_lock: threading.Lock | None = None,
                     commit_idle: bool = False) -> tuple[Checkpoint, threading.Thread]:
    """slurm_mm's periodic checkpoint: dump to staging (job left running), then commit in
    a background thread (started here, returned) that removes the staging copy.
    dump_lock: held around the dump only (one CRIU dump at a time on the node).
    commit_idle: the commit thread (and the zstd workers it starts, which inherit it)
    runs under SCHED_IDLE, so it only takes CPU time the jobs leave."""
    ck = Checkpoint()
    images = staging / f"ckpt-{job_id}"
    shutil.rmtree(images, ignore_errors=True)
    if dump_lock is not None:
        dump_lock.acquire()
    try:
        ck.t0_ns = time.monotonic_ns()  # a job waiting for the lock still runs
        result: CheckpointResult = checkpoint_tree(job.init_pid, images, leave_running=True, criu=CRIU)
        ck.resumed_ns = time.monotonic_ns()
    finally:
        if dump_lock is not None:
            dump_lock.release()
    ck.dump_s = result.timings.get("dump", 0.0)
    ck.engine_timings = dict(result.timings)
    ck.image_bytes = result.image_bytes

    def background() -> None:
        try:
            if commit_idle:
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread only
            ck.commit_s, image = commit(store, job_id, images)
            ck.stored_bytes = sum(f.stored_size for f in image.manifest.files)
        except Exception as exc:  # noqa: BLE001 - reported with the figures
            ck.error = f"{type(exc).__name__}: {exc}"
        finally:
            ck.done_ns = time.monotonic_ns()
            shutil.rmtree(images, ignore_errors=True)
            if on_done:
                on_done.set()

    thread = threading.Thread(target=background, name=f"commit-{job_id}", daemon=True)
    thread.start()
    return ck, thread


def serial_checkpoint(job: Job, shared: Path, store: ImageStore, job_id: str) -> Checkpoint:
    """The serial baseline: dump straight into the shared directory with the tree left
    stopped, commit it from there, and only then let the job run."""
    ck = Checkpoint()
    images = shared / f"serial-{job_id}"
    shutil.rmtree(images, ignore_errors=True)
    ck.t0_ns = time.monotonic_ns()
    pids = raw.tree(job.init_pid)
    try:
        result = checkpoint_tree(job.init_pid, images, leave_running=False, criu=CRIU,
                                 extra_criu_args=["--leave-stopped"])
        ck.dump_s = result.timings.get("dump", 0.0)
        ck.image_bytes = result.image_bytes
        ck.commit_s, image = commit(store, job_id, images)
        ck.stored_bytes = sum(f.stored_size for f in image.manifest.files)
    finally:
        raw.resume(pids)
        ck.resumed_ns = ck.done_ns = time.monotonic_ns()
        shutil.rmtree(images, ignore_errors=True)
    return ck


def raw_dump_to_shared(job: Job, shared: Path) -> Checkpoint:
    """Context, not a slurm_mm pipeline: `criu dump --leave-running` by hand straight into
    the shared directory, no checksum, no fsync, no commit."""
    ck = Checkpoint()
    images = shared / "raw-dump"
    shutil.rmtree(images, ignore_errors=True)
    ck.t0_ns = time.monotonic_ns()
    ck.dump_s = raw.criu_dump(job.init_pid, images, images.parent / "raw-dump-log", leave="running")
    ck.resumed_ns = ck.done_ns = time.monotonic_ns()
    ck.image_bytes = raw.size_of(images)
    shutil.rmtree(images, ignore_errors=True)
    return ck


def restore_job(job: Job, images: Path) -> float:
    """slurm_mm restore of `images` for `job` (owner check on); seconds until it returns."""
    t0 = time.monotonic()
    tree = restore_tree(images, owner_uid=OWNER[0], owner_gids=[OWNER[1]], criu=CRIU)
    elapsed = time.monotonic() - t0
    job.adopt(restored=tree)
    return elapsed


def felt(job: Job, ck: Checkpoint, settle: float = 0.1) -> float:
    """The longest stall the app itself logged while the job was blocked (seconds)."""
    time.sleep(settle)  # the app writes its stats at the end of the stalled iteration
    return job.app.stats().longest_stall_in(ck.t0_ns, ck.resumed_ns)


def rate(job: Job, seconds: float) -> float:
    """The app's iterations per second over the next `seconds` (its own counters)."""
    s0 = job.app.stats()
    time.sleep(seconds)
    s1 = job.app.stats()
    return (s1.iters - s0.iters) / ((s1.now_ns - s0.now_ns) / 1e9)
