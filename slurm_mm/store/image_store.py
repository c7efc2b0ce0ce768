"""The image store: checkpoint images of jobs on a shared filesystem.

Layout (docs/design.md, "Store layout"):

    <root>/                      root 0711
      <job_id>/                  root 0750 + ACL user:<uid>:r-x
        .lock                    writers of this job, serialised (filelock)
        .fence.lock              guards `fence` only, so a new run never waits for a writer
        fence                    highest epoch that started; lower epochs cannot commit
        .tmp-<seq>-<rand>/       being written, never listed; gc removes leftovers
        ckpt-<seq:06d>/          complete and verified
          manifest.json
          <file>.zst | <file>.raw  (also in subdirectories of the image)

What it guarantees: an image is either complete and verified or invisible. Complete and
verified means: written under .tmp-*, every file synced (fsync) and every stored chunk
then read back through a second file descriptor and found equal (xxh3-128) to the buffer
that was written, the manifest and the directories synced, the tree listed and found to be
exactly the manifest's, then renamed (pipeline.py). With read_back="cache" the read-back
may come from the page cache, as a restore on the same node would; "device" evicts the
synced pages first so the storage itself is read. Not re-checked at commit: that a zstd
frame decodes to its raw chunk (zstd's own round trip; extract and verify check it, and
an image that fails there is skipped for the previous one). A writer whose epoch is below the
fence never renames (checked under the fence lock at rename time); a damaged image is
skipped for the previous one with a logged reason; retention keeps the newest `keep` good
images. What it trusts and never does: see safe_fs (no symlinks, no user-writable
directories, names are single components). It knows files, compression and locks, never
processes or Slurm.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import zstandard

from slurm_mm import defaults as d
from slurm_mm.errors import (
    ConfigError,
    ImageCorrupt,
    ImageError,
    ImageRefused,
    NoImage,
    SlurmMMError,
    StaleEpoch,
    StoreBusy,
    UnsafePath,
    UsageError,
)
from slurm_mm.store import acl, chunks, compression, pipeline, tree
from slurm_mm.store.manifest import FORMAT_VERSION, MANIFEST_NAME, MAX_MANIFEST_BYTES, FileEntry, Manifest, Trigger
from slurm_mm.store.priority import Priority
from slurm_mm.store.safe_fs import (
    check_name,
    create_file,
    make_dir,
    name_problem,
    open_dir,
    open_read,
    read_limited,
    remove_entry,
    show,
    write_all,
)

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""Called with (bytes_done, bytes_total) of raw data as a commit or extract streams. Keep it
cheap: extract calls it from its worker threads, one at a time under a lock."""

LOCK_NAME = ".lock"
FENCE_LOCK_NAME = ".fence.lock"
FENCE_NAME = "fence"
TMP_PREFIX = ".tmp-"
_FENCE_TMP_PREFIX = ".fence-tmp-"
_CKPT_RE = re.compile(r"ckpt-(\d{6,})")
_MAX_WORKERS = 32
# Files read or written by one pool at a time (each holds an fd or two).
_FILES_PER_BATCH = 128
BACKGROUND_TRIGGERS = (Trigger.PERIODIC,)
"""Commits for these triggers run while the job runs on: their threads yield the CPU to it."""

# read_back="auto" (the default): a periodic commit shares the node with running jobs,
# so it writes and reads back with O_DIRECT ("device": about 0.5 CPU-s per GB less than
# buffered I/O, measured); a stopping commit (preemption, drain) has the node to itself
# and GraceTime to meet, so it takes the faster buffered path ("cache": no second pass
# over the disk).
READ_BACK_CHOICES = (*pipeline.READ_BACK_MODES, "auto")

MIN_LEVEL = -7

PHASES = ("locked", "tmp-created", "file-written", "manifest-written", "synced", "verified", "renamed",
          "collected")
"""Points of commit() at which phase_hook is called, in order ("file-written" once per file)."""

phase_hook: Callable[[str], None] | None = None
"""Test-only patch point, called with each name in PHASES: crash tests kill a writer there.
Deliberately not read from the environment, which must never steer root code."""


def _phase(name: str) -> None:
    hook = phase_hook
    if hook is not None:
        hook(name)


@dataclass(frozen=True)
class Image:
    """A complete image of a job: its directory, sequence number and parsed manifest."""

    path: Path
    seq: int
    manifest: Manifest

    @property
    def job_id(self) -> str:
        return self.manifest.job_id


@dataclass(frozen=True)
class Skipped:
    """An image passed over when choosing one to restore, and why (for logs and `status`)."""

    path: Path
    reason: str


class _Progress:
    """Thread-safe running total for a Progress callback."""

    def __init__(self, total: int, callback: Progress | None) -> None:
        self.total = total
        self.done = 0
        self._callback = callback
        self._lock = threading.Lock()
        if callback:
            callback(0, total)

    @property
    def counter(self) -> Callable[[int], None] | None:
        return self._add if self._callback else None

    def _add(self, n: int) -> None:
        with self._lock:
            self.done += n
            self._callback(self.done, self.total)  # type: ignore[misc]


class ImageStore:
    """Checkpoint images of jobs under one root directory on a shared filesystem."""

    def __init__(self, root: Path | str, *, level: int = 3, threads: int = 0, keep: int = 3,
                 lock_timeout: float = 60.0, chunk_size: int = chunks.DEFAULT_CHUNK_SIZE,
                 read_back: str = d.COMMIT_READ_BACK, background_cpus: float | None = None) -> None:
        """level: zstd level (-7 to 22; negative levels are zstd's fast modes); threads:
        worker threads of a commit, verify or extract, 0 = one per CPU; keep: complete images
        kept per job; lock_timeout: seconds a writer waits for another before StoreBusy;
        chunk_size: bytes per chunk of new images; read_back: how a commit reads its chunks
        back, "device" (from the storage, past the page cache), "cache" (pipeline.py) or
        "auto": device for periodic commits, cache for the others (see READ_BACK_CHOICES);
        background_cpus: CPU seconds per second that a periodic commit's threads may use
        together (None: no limit beyond their idle priority; see priority.Priority)."""
        if isinstance(level, bool) or not isinstance(level, int) or level == 0 \
                or not MIN_LEVEL <= level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise ConfigError(f"compression level {show(level)} is not in {MIN_LEVEL}-"
                              f"{zstandard.MAX_COMPRESSION_LEVEL} (and not 0)")
        if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= 256:
            raise ConfigError(f"compression threads {show(threads)} is not in 0-256")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"images to keep {show(keep)} is not a positive integer")
        if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)) or not lock_timeout >= 0:
            raise ConfigError(f"lock timeout {show(lock_timeout)} is not a number of seconds >= 0")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) \
                or not chunks.MIN_CHUNK_SIZE <= chunk_size <= chunks.MAX_CHUNK_SIZE:
            raise ConfigError(f"chunk size {show(chunk_size)} is not in {chunks.MIN_CHUNK_SIZE}-"
                              f"{chunks.MAX_CHUNK_SIZE} bytes")
        if background_cpus is not None and (isinstance(background_cpus, bool)
                                            or not isinstance(background_cpus, (int, float))
                                            or not 0 < background_cpus <= 1024):
            raise ConfigError(f"background CPUs {show(background_cpus)} is not a number in (0, 1024]")
        if read_back not in READ_BACK_CHOICES:
            raise ConfigError(f"read_back {show(read_back)} is not one of {', '.join(READ_BACK_CHOICES)}")
        self.root = Path(root)
        self.level = level
        self.threads = threads
        self.keep = keep
        self.lock_timeout = float(lock_timeout)
        self.chunk_size = chunk_size
        self.read_back = read_back
        self.background_cpus = background_cpus
        self._workers = min(_MAX_WORKERS, threads or os.cpu_count() or 1)
        self._warned_no_acl = False
        self._active: dict[str, list[Priority]] = {}
        self._active_lock = threading.Lock()

    def _read_back(self, priority: Priority) -> str:
        if self.read_back != "auto":
            return self.read_back
        return "device" if priority.background else "cache"

    def hurry(self, job_id: str | None = None) -> None:
        """Let commits in progress (of `job_id`, or all) run at normal priority from their
        next chunk on: a more urgent checkpoint of the job is waiting for them."""
        with self._active_lock:
            for job, priorities in self._active.items():
                if job_id is None or job == job_id:
                    for p in priorities:
                        p.hurry()

    # ------------------------------------------------------------------ job directory

    def prepare_job(self, job_id: str, uid: int, gid: int) -> Path:
        """Create (or check) the job's directory, readable by its owner `uid`. Refuses a
        directory left by an earlier job of another user under the same (reused) job id."""
        job_id = check_name(job_id, kind="job id")
        _check_ids(uid, gid)
        with self._io(f"job {job_id}: preparing its directory"), self._root_fd(create=True) as rfd:
            os.close(self._job_fd(rfd, job_id, owner=(uid, gid)))  # type: ignore[arg-type]
        return self.root / job_id

    def advance_epoch(self, job_id: str, epoch: int) -> None:
        """Record that run `epoch` of the job has started, so no older run can commit again.
        Raises StaleEpoch if a newer run already started (this caller is the stale copy)."""
        job_id = check_name(job_id, kind="job id")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise UsageError(f"epoch {show(epoch)} is not an integer >= 0")
        with self._io(f"job {job_id}: advancing its epoch"), self._job(job_id) as jfd:
            if jfd is None:
                raise ImageError(f"job {job_id}: no directory {self.root / job_id}; prepare_job first")
            with self._lock(job_id, FENCE_LOCK_NAME):
                fence = self._read_fence(jfd, job_id)
                if epoch < fence:
                    raise StaleEpoch(f"job {job_id}: epoch {epoch} is older than the fence {fence}")
                if epoch > fence:
                    self._write_fence(jfd, job_id, epoch)

    def remove_job(self, job_id: str) -> None:
        """Remove the job's directory and every image in it (the job is over)."""
        job_id = check_name(job_id, kind="job id")
        with self._io(f"job {job_id}: removing its directory"), self._root_fd(create=False) as rfd:
            if rfd is None:
                return
            jfd = self._job_fd(rfd, job_id)
            if jfd is None:
                return
            # Rename first so the job vanishes at once; a crash mid-removal leaves only a
            # hidden .tmp-rm-* that no job id can name.
            doomed = f"{TMP_PREFIX}rm-{job_id}-{secrets.token_hex(4)}"
            try:
                with self._lock(job_id, LOCK_NAME):
                    os.rename(job_id, doomed, src_dir_fd=rfd, dst_dir_fd=rfd)
                    os.fsync(rfd)
            finally:
                os.close(jfd)
            remove_entry(doomed, dir_fd=rfd)
            logger.info("job %s: removed %s", job_id, self.root / job_id)

    # ------------------------------------------------------------------ writing

    def commit(self, job_id: str, source_dir: Path | str, *, epoch: int, uid: int, gid: int, node: str,
               trigger: str, gpu: dict[str, Any] | None = None, criu_version: str = "",
               extra: dict[str, Any] | None = None, progress: Progress | None = None,
               cpus: frozenset[int] | None = None) -> Image:
        """Store the files of `source_dir` (regular files, in subdirectories too) as the job's
        newest image. cpus: the CPUs a periodic commit's threads run on (the node's CPUs no
        job uses: agent/commit_cpus.py); None: wherever the scheduler puts them.

        Atomic: the image becomes visible only once written, synced and read back equal.
        A periodic commit (BACKGROUND_TRIGGERS) runs its threads at idle priority, so the
        running job loses next to no CPU time to it; hurry() lifts that. Raises
        StaleEpoch if `epoch` is below the job's fence (then nothing is written), StoreBusy
        if another writer holds the job longer than lock_timeout, UnsafePath for a symlink
        or a bad name in source_dir. Afterwards applies retention (see gc).
        """
        job_id = check_name(job_id, kind="job id")
        _check_ids(uid, gid)
        meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION, "job_id": job_id, "epoch": epoch, "uid": uid, "gid": gid,
            "node": node, "created": time.time(), "trigger": trigger, "files": [], "gpu": gpu,
            "criu_version": criu_version, "extra": {} if extra is None else extra,
            "hash": chunks.HASH_NAME, "dirs": [],
        }
        # Same checks as a manifest read back later, but reported as the caller's mistake.
        Manifest.from_dict(meta, source=f"commit for job {job_id}", error=UsageError)
        try:
            json.dumps([gpu, meta["extra"]], allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"commit for job {job_id}: gpu/extra are not plain JSON: {exc}") from None
        # Store what a later reader will parse back (tuples become lists, keys strings).
        meta["gpu"], meta["extra"] = json.loads(json.dumps([gpu, meta["extra"]]))
        source = Path(source_dir)
        priority = Priority(background=trigger in BACKGROUND_TRIGGERS, cpu_share=self.background_cpus,
                            cpus=cpus)
        with self._active_lock:
            self._active.setdefault(job_id, []).append(priority)
        try:
            with self._io(f"job {job_id}: writing an image"), self._root_fd(create=True) as rfd:
                jfd = self._job_fd(rfd, job_id, owner=(uid, gid))
                try:
                    return self._commit(jfd, job_id, source, meta, progress, priority)  # type: ignore[arg-type]
                finally:
                    os.close(jfd)  # type: ignore[arg-type]
        finally:
            with self._active_lock:
                self._active[job_id].remove(priority)
                if not self._active[job_id]:
                    del self._active[job_id]

    def _commit(self, jfd: int, job_id: str, source: Path, meta: dict[str, Any],
                progress: Progress | None, priority: Priority) -> Image:
        epoch = meta["epoch"]
        with self._lock(job_id, LOCK_NAME):
            _phase("locked")
            fence = self._read_fence(jfd, job_id)
            if epoch < fence:
                raise StaleEpoch(f"job {job_id}: epoch {epoch} is older than the fence {fence}; image not written")
            seq = max((s for s, _ in self._ckpt_names(jfd)), default=0) + 1
            final = f"ckpt-{seq:06d}"
            tmp = f"{TMP_PREFIX}{seq:06d}-{secrets.token_hex(4)}"
            try:
                manifest = self._write_image(jfd, job_id, tmp, source, meta, progress, priority)
                # The fence is checked again at the rename, under its own lock: a new run may
                # have started while this image was being written.
                with self._lock(job_id, FENCE_LOCK_NAME):
                    fence = self._read_fence(jfd, job_id)
                    if epoch < fence:
                        raise StaleEpoch(
                            f"job {job_id}: epoch {epoch} was fenced off by epoch {fence} while writing; "
                            "image discarded")
                    if epoch > fence:
                        self._write_fence(jfd, job_id, epoch)
                    os.rename(tmp, final, src_dir_fd=jfd, dst_dir_fd=jfd)
                    os.fsync(jfd)
            except BaseException:
                _remove_quietly(tmp, jfd)
                raise
            _phase("renamed")
            image = Image(path=self.root / job_id / final, seq=seq, manifest=manifest)
            logger.info("job %s: committed %s (epoch %d, %s, %d -> %d bytes)", job_id, image.path, epoch,
                        manifest.trigger, manifest.total_size, manifest.stored_size)
            try:
                self._collect(jfd, job_id)
            except (OSError, SlurmMMError) as exc:
                # The image is committed; failing the commit now would make the caller treat
                # a good checkpoint as lost. The next commit or gc retries the collection.
                logger.warning("job %s: retention after %s failed: %s", job_id, final, exc)
            _phase("collected")
            return image

    def _write_image(self, jfd: int, job_id: str, tmp: str, source: Path, meta: dict[str, Any],
                     progress: Progress | None, priority: Priority) -> Manifest:
        uid, gid = meta["uid"], meta["gid"]
        tmp_path = self.root / job_id / tmp
        sfd = open_dir(source, dir_fd=None, path=source)
        src_dirs = tree.DirFds(sfd, source)
        try:
            listing = tree.walk(sfd, source)
            if not listing.files:
                raise ImageError(f"{source} holds no files to store")
            for rel_dir in listing.dirs:
                src_dirs.fd(rel_dir)
            names = [name for name, _ in listing.files]
            sizes = [size for _, size in listing.files]
            zst_modes = [size > self.chunk_size and self._worth_compressing(src_dirs, source, name)
                         for name, size in listing.files]
            tfd = make_dir(tmp, dir_fd=jfd, mode=0o750, path=tmp_path)
            dst_dirs = tree.DirFds(tfd, tmp_path)
            try:
                _phase("tmp-created")
                self._grant(tfd, uid, gid, directory=True, path=tmp_path)
                for rel_dir in listing.dirs:
                    self._grant(dst_dirs.make(rel_dir, 0o750), uid, gid, directory=True, path=tmp_path / rel_dir)
                tracker = _Progress(sum(sizes), progress)

                def stored_name(i: int, zst: bool) -> tuple[int, str]:
                    parent, base = dst_dirs.parent_and_name(names[i])
                    return parent, base + (".zst" if zst else ".raw")

                def create_stored(i: int, zst: bool) -> int:
                    parent, name = stored_name(i, zst)
                    fd = create_file(name, dir_fd=parent, mode=0o640)
                    try:
                        self._grant(fd, uid, gid, directory=False, path=tmp_path)
                    except BaseException:
                        os.close(fd)
                        raise
                    return fd

                def open_stored(i: int, zst: bool) -> int:
                    parent, name = stored_name(i, zst)
                    return open_read(name, dir_fd=parent, path=tmp_path / names[i])

                def open_source(i: int) -> int:
                    parent, base = src_dirs.parent_and_name(names[i])
                    return open_read(base, dir_fd=parent, path=source / names[i], check_owner=False)

                try:
                    written = pipeline.write_files(
                        sizes, zst_modes=zst_modes, open_source=open_source, create_stored=create_stored,
                        open_stored=open_stored, encoder=chunks.Encoder(self.level), chunk_size=self.chunk_size,
                        workers=self._workers, priority=priority, read_back=self._read_back(priority),
                        on_bytes=tracker.counter, on_file_written=lambda i: _phase("file-written"))
                except pipeline.SourceChanged as exc:
                    raise ImageError(f"{source / names[exc.index]} {exc}") from None
                except pipeline.ReadBackMismatch as exc:
                    raise ImageCorrupt(f"{tmp_path / names[exc.index]}: {exc} (the storage returned other "
                                       "bytes than were written)") from None
                entries = tuple(
                    FileEntry(name=names[i], size=sizes[i], stored_size=w.stored_size, sha256="", compressed=w.zst,
                              chunk_size=self.chunk_size, chunks=tuple(w.chunks))
                    for i, w in enumerate(written))
                manifest = Manifest(**{**meta, "files": entries, "dirs": listing.dirs})
                mfd = create_file(MANIFEST_NAME, dir_fd=tfd, mode=0o640)
                try:
                    self._grant(mfd, uid, gid, directory=False, path=tmp_path)
                    write_all(mfd, manifest.to_json().encode())
                    os.fsync(mfd)
                finally:
                    os.close(mfd)
                _phase("manifest-written")
                for dfd in reversed(dst_dirs.opened()):
                    os.fsync(dfd)
                _phase("synced")
                # Every chunk was read back and checked as it was synced; what is left is the
                # tree itself and the manifest on disk.
                self._check_listing(tfd, manifest, tmp_path)
                _phase("verified")
                return manifest
            finally:
                dst_dirs.close()
                os.close(tfd)
        finally:
            src_dirs.close()
            os.close(sfd)

    def _worth_compressing(self, src_dirs: tree.DirFds, source: Path, name: str) -> bool:
        """A multi-chunk file becomes a .zst when slices across it compress (each chunk then
        still decides for itself); else a .raw, with no chunk passed through zstd."""
        parent, base = src_dirs.parent_and_name(name)
        fd = open_read(base, dir_fd=parent, path=source / name, check_owner=False)
        try:
            return compression.worth_compressing(fd, self.level)
        finally:
            os.close(fd)

    def gc(self, job_id: str) -> list[Path]:
        """Apply retention now: keep the newest `keep` images whose manifest reads, remove older
        ones and every .tmp-* leftover (the writer lock is held, so their writers are gone).
        Returns what was removed. StoreBusy while a writer is active beyond lock_timeout."""
        job_id = check_name(job_id, kind="job id")
        with self._io(f"job {job_id}: collecting old images"), self._job(job_id) as jfd:
            if jfd is None:
                return []
            with self._lock(job_id, LOCK_NAME):
                return self._collect(jfd, job_id)

    def _collect(self, jfd: int, job_id: str) -> list[Path]:
        """Retention, with the writer lock held."""
        job_path = self.root / job_id
        removed: list[Path] = []
        for name in sorted(os.listdir(jfd)):
            if name.startswith(TMP_PREFIX):
                remove_entry(name, dir_fd=jfd)
                removed.append(job_path / name)
        kept = 0
        for seq, name in self._ckpt_names(jfd):
            if kept < self.keep:
                try:
                    self._load(jfd, job_id, name, seq)
                    kept += 1
                except (ImageCorrupt, UnsafePath):
                    pass  # an unreadable image does not count toward `keep`; it goes once older
                continue
            # Rename first: a crash mid-removal leaves a .tmp-* (collected later), never a
            # ckpt-* with files missing.
            doomed = f"{TMP_PREFIX}gc-{name}-{secrets.token_hex(4)}"
            os.rename(name, doomed, src_dir_fd=jfd, dst_dir_fd=jfd)
            remove_entry(doomed, dir_fd=jfd)
            removed.append(job_path / name)
        if removed:
            os.fsync(jfd)
            logger.info("job %s: removed %s", job_id, ", ".join(p.name for p in removed))
        return removed

    # ------------------------------------------------------------------ reading

    def images(self, job_id: str, *, skipped: list[Skipped] | None = None) -> list[Image]:
        """Complete images of the job, newest first. Manifests are parsed (an unreadable one is
        skipped, logged and appended to `skipped`), files are not checksummed: see verify()."""
        job_id = check_name(job_id, kind="job id")
        with self._io(f"job {job_id}: listing images"), self._job(job_id) as jfd:
            if jfd is None:
                return []
            result = []
            for seq, name in self._ckpt_names(jfd):
                try:
                    result.append(self._load(jfd, job_id, name, seq))
                except FileNotFoundError:
                    continue  # collected while we listed
                except (ImageCorrupt, UnsafePath) as exc:
                    self._skip(skipped, job_id, self.root / job_id / name, str(exc))
            return result

    def latest(self, job_id: str, *, max_epoch: int | None = None,
               skipped: list[Skipped] | None = None) -> Image | None:
        """Newest image that verifies (sizes and checksums of every file); damaged or unsafe
        ones are skipped with a logged reason, also appended to `skipped`. max_epoch: ignore
        images written by a later run. None if no image verifies.

        To restore, extract_latest() is cheaper: it checks while extracting, reading once.
        """
        for image in self._candidates(job_id, max_epoch, skipped):
            try:
                self.verify(image)
                return image
            except (ImageCorrupt, UnsafePath) as exc:
                self._skip(skipped, job_id, image.path, str(exc))
        return None

    def verify(self, image: Image) -> None:
        """Check the image's files against its manifest: no missing or extra file, no
        symlink, every size and checksum right (each chunk's hash, and each zstd frame's
        header announces its chunk's size; frames are decoded by extract, not here). Raises ImageCorrupt (UnsafePath for a symlink or a file
        writable by others)."""
        with self._image_fd(image) as dfd:
            self._verify_dir(dfd, image.manifest, image.path)

    def extract(self, image: Image, dest: Path | str, progress: Progress | None = None) -> Manifest:
        """Decompress the image into the new directory `dest` (mode 0700), checking every size
        and checksum on the way, chunks in parallel. `dest` appears only when everything checked out; on
        ImageCorrupt nothing is left behind. dest's parent must be root's and not writable by
        others: the restore reads these files as root."""
        dest = Path(dest)
        problem = name_problem(dest.name, kind="destination name")
        if problem:
            raise UnsafePath(f"{dest}: {problem}")
        with self._io(f"extracting {image.path} to {dest}"):
            pfd = open_dir(dest.parent, dir_fd=None, path=dest.parent)
            try:
                if _exists(dest.name, pfd):
                    raise ImageError(f"{dest} already exists")
                tmp = f".{dest.name}.tmp-{secrets.token_hex(4)}"
                with self._image_fd(image) as dfd:
                    tfd = make_dir(tmp, dir_fd=pfd, mode=0o700, path=dest.parent / tmp)
                    out_dirs = tree.DirFds(tfd, dest.parent / tmp)
                    try:
                        self._check_listing(dfd, image.manifest, image.path)
                        for rel_dir in image.manifest.dirs:
                            out_dirs.make(rel_dir, 0o700)
                        tracker = _Progress(image.manifest.total_size, progress)
                        self._check_files(dfd, image.manifest, image.path, out_dirs, tracker)
                        os.rename(tmp, dest.name, src_dir_fd=pfd, dst_dir_fd=pfd)
                    except BaseException:
                        _remove_quietly(tmp, pfd)
                        raise
                    finally:
                        out_dirs.close()
                        os.close(tfd)
            finally:
                os.close(pfd)
        return image.manifest

    def extract_latest(self, job_id: str, dest: Path | str, *, max_epoch: int | None = None,
                       progress: Progress | None = None, skipped: list[Skipped] | None = None) -> Image:
        """Extract the newest image that checks out, falling back to older ones (each skip is
        logged and appended to `skipped`). NoImage if none does."""
        for image in self._candidates(job_id, max_epoch, skipped):
            try:
                self.extract(image, dest, progress)
                return image
            except (ImageCorrupt, UnsafePath) as exc:
                self._skip(skipped, job_id, image.path, str(exc))
        raise NoImage(f"job {job_id}: no complete, verified image in {self.root / job_id}")

    # ------------------------------------------------------------------ internals

    def _candidates(self, job_id: str, max_epoch: int | None, skipped: list[Skipped] | None) -> Iterator[Image]:
        for image in self.images(job_id, skipped=skipped):
            if max_epoch is not None and image.manifest.epoch > max_epoch:
                self._skip(skipped, job_id, image.path,
                           f"epoch {image.manifest.epoch} is newer than {max_epoch}")
                continue
            yield image

    @staticmethod
    def _skip(skipped: list[Skipped] | None, job_id: str, path: Path, reason: str) -> None:
        logger.warning("job %s: skipping %s: %s", job_id, path.name, reason)
        if skipped is not None:
            skipped.append(Skipped(path=path, reason=reason))

    @contextmanager
    def _io(self, what: str) -> Iterator[None]:
        """Report an unexpected OSError (full disk, I/O error) as one line naming the action."""
        try:
            yield
        except OSError as exc:
            detail = exc.strerror or str(exc)
            where = f" ({exc.filename})" if exc.filename else ""
            raise ImageError(f"{what} failed: {detail}{where}") from None

    @contextmanager
    def _root_fd(self, *, create: bool) -> Iterator[int | None]:
        """The checkpoint root, checked; None if it does not exist and create is False."""
        try:
            fd = open_dir(self.root, dir_fd=None, path=self.root, search_only=True)
        except FileNotFoundError:
            if not create:
                yield None
                return
            try:
                os.mkdir(self.root, 0o711)
            except FileExistsError:
                pass
            fd = open_dir(self.root, dir_fd=None, path=self.root)
        try:
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def _job(self, job_id: str) -> Iterator[int | None]:
        with self._root_fd(create=False) as rfd:
            jfd = None if rfd is None else self._job_fd(rfd, job_id)
            try:
                yield jfd
            finally:
                if jfd is not None:
                    os.close(jfd)

    def _job_fd(self, rfd: int, job_id: str, *, owner: tuple[int, int] | None = None) -> int | None:
        """Open the job's directory; with `owner` (uid, gid), create it if missing and make
        sure it is that user's."""
        path = self.root / job_id
        try:
            jfd = open_dir(job_id, dir_fd=rfd, path=path)
        except FileNotFoundError:
            if owner is None:
                return None
            try:
                jfd = make_dir(job_id, dir_fd=rfd, mode=0o750, path=path)
            except FileExistsError:  # another node created it just now
                jfd = open_dir(job_id, dir_fd=rfd, path=path)
        if owner is not None:
            try:
                self._own_job_dir(jfd, path, *owner)
            except BaseException:
                os.close(jfd)
                raise
        return jfd

    def _own_job_dir(self, jfd: int, path: Path, uid: int, gid: int) -> None:
        # Slurm reuses job ids (wrap-around, a rebuilt controller): never hand one user's
        # images to another, nor mix their images.
        try:
            users = acl.named_users(jfd)
        except ValueError as exc:
            raise UnsafePath(f"{path} has a malformed ACL: {exc}") from None
        if users:
            if users != [uid]:
                raise ImageRefused(f"{path} belongs to uid {users[0]}, not {uid}; remove it to reuse the job id")
            return
        st = os.fstat(jfd)
        if st.st_gid == gid and st.st_gid != 0:
            return  # group fallback (no ACLs on this filesystem) already in place
        if st.st_gid != 0:
            raise ImageRefused(f"{path} belongs to group {st.st_gid}, not {gid}; remove it to reuse the job id")
        self._grant(jfd, uid, gid, directory=True, path=path)

    def _grant(self, fd: int, uid: int, gid: int, *, directory: bool, path: Path) -> None:
        if not acl.grant_owner_read(fd, uid, gid, directory=directory) and not self._warned_no_acl:
            self._warned_no_acl = True
            logger.warning("%s: the filesystem refuses POSIX ACLs; job owner uid %d reads images through "
                           "group %d instead (mode 0750), so that whole group can read them", path, uid, gid)

    @contextmanager
    def _lock(self, job_id: str, name: str) -> Iterator[None]:
        # filelock opens by path: safe because the job directory, already checked to be
        # root's and unwritable by others, is the only place a link could be planted.
        path = self.root / job_id / name
        lock = filelock.FileLock(path, timeout=self.lock_timeout, mode=0o600, thread_local=False)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise StoreBusy(
                f"job {job_id}: another writer holds {path} (waited {self.lock_timeout:g} s)") from None
        try:
            yield
        finally:
            lock.release()

    def _read_fence(self, jfd: int, job_id: str) -> int:
        """Highest epoch started, -1 if none. A damaged fence refuses commits (ImageCorrupt):
        guessing could let a stale copy through."""
        path = self.root / job_id / FENCE_NAME
        try:
            fd = open_read(FENCE_NAME, dir_fd=jfd, path=path)
        except FileNotFoundError:
            return -1
        try:
            data = read_limited(fd, 32, path=path)
        except OverflowError:
            raise ImageCorrupt(f"{path} is too large to be an epoch") from None
        finally:
            os.close(fd)
        text = data.decode("ascii", "replace").strip()
        if not (text.isascii() and text.isdigit()):
            raise ImageCorrupt(f"{path}: {show(text)} is not an epoch")
        return int(text)

    def _write_fence(self, jfd: int, job_id: str, epoch: int) -> None:
        """Replace the fence atomically; called with the fence lock held."""
        for name in os.listdir(jfd):
            if name.startswith(_FENCE_TMP_PREFIX):  # left by a writer killed mid-update
                remove_entry(name, dir_fd=jfd)
        tmp = f"{_FENCE_TMP_PREFIX}{secrets.token_hex(4)}"
        fd = create_file(tmp, dir_fd=jfd, mode=0o644)
        try:
            write_all(fd, f"{epoch}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, FENCE_NAME, src_dir_fd=jfd, dst_dir_fd=jfd)
        os.fsync(jfd)
        logger.info("job %s: fence advanced to epoch %d", job_id, epoch)

    @staticmethod
    def _ckpt_names(jfd: int) -> list[tuple[int, str]]:
        """(seq, name) of ckpt-* entries, newest first."""
        found = []
        for name in os.listdir(jfd):
            m = _CKPT_RE.fullmatch(name)
            if m:
                found.append((int(m.group(1)), name))
        return sorted(found, reverse=True)

    def _load(self, jfd: int, job_id: str, name: str, seq: int) -> Image:
        """Open an image directory and parse its manifest (no checksums)."""
        path = self.root / job_id / name
        mpath = path / MANIFEST_NAME
        try:
            dfd = open_dir(name, dir_fd=jfd, path=path)
            try:
                data = _read_manifest_bytes(dfd, mpath)
            finally:
                os.close(dfd)
        except OverflowError as exc:
            raise ImageCorrupt(str(exc)) from None
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise ImageCorrupt(f"{path}: {exc.strerror}") from None
        manifest = Manifest.from_json(data, source=str(mpath))
        if manifest.job_id != job_id:
            raise ImageCorrupt(f"{mpath}: job_id {show(manifest.job_id)} is not {job_id}")
        return Image(path=path, seq=seq, manifest=manifest)

    @contextmanager
    def _image_fd(self, image: Image) -> Iterator[int]:
        """Re-open an image's directory from the root by job id and sequence number (never by
        image.path, which is only informative)."""
        job_id = check_name(image.job_id, kind="job id")
        name = f"ckpt-{image.seq:06d}"
        path = self.root / job_id / name
        try:
            with self._job(job_id) as jfd:
                if jfd is None:
                    raise ImageCorrupt(f"{self.root / job_id} is missing")
                try:
                    dfd = open_dir(name, dir_fd=jfd, path=path)
                except FileNotFoundError:
                    raise ImageCorrupt(f"{path} is missing") from None
        except OSError as exc:
            raise ImageCorrupt(f"{path}: {exc.strerror}") from None
        try:
            yield dfd
        finally:
            os.close(dfd)

    def _verify_dir(self, dfd: int, manifest: Manifest, path: Path) -> None:
        self._check_listing(dfd, manifest, path)
        self._check_files(dfd, manifest, path, None, None)

    def _check_files(self, dfd: int, manifest: Manifest, path: Path, out_dirs: tree.DirFds | None,
                     tracker: _Progress | None) -> None:
        """Check every file of the image, writing the raw bytes below `out_dirs` if given."""
        old = tuple(f for f in manifest.files if not f.chunked)
        if old:  # images of format 1: one stream per file
            def check_one(entry: FileEntry, cancelled: Callable[[], bool]) -> None:
                out = None if out_dirs is None else create_file(entry.name, dir_fd=out_dirs.fd(""), mode=0o600)
                try:
                    self._check_file(dfd, entry, path, out, tracker, cancelled)
                finally:
                    if out is not None:
                        os.close(out)
            self._each_file(old, check_one)
        new = sorted((f for f in manifest.files if f.chunked), key=lambda f: f.size, reverse=True)
        if not new:
            return
        image_dirs = tree.DirFds(dfd, path)
        try:
            for start in range(0, len(new), _FILES_PER_BATCH):
                self._check_chunked(new[start:start + _FILES_PER_BATCH], image_dirs, path, out_dirs, tracker)
        finally:
            image_dirs.close()

    def _check_chunked(self, entries: list[FileEntry], image_dirs: tree.DirFds, path: Path,
                       out_dirs: tree.DirFds | None, tracker: _Progress | None) -> None:
        fds: list[int] = []
        try:
            files = []
            for entry in entries:
                spath = path / entry.stored_name
                parent, base = image_dirs.parent_and_name(entry.stored_name)
                try:
                    fd = open_read(base, dir_fd=parent, path=spath)
                except FileNotFoundError:
                    raise ImageCorrupt(f"{spath} is missing") from None
                except OSError as exc:
                    raise ImageCorrupt(f"{spath}: {exc.strerror}") from None
                fds.append(fd)
                size = os.fstat(fd).st_size
                if size != entry.stored_size:
                    raise ImageCorrupt(f"{spath} has {size} bytes, manifest says {entry.stored_size}")
                out = None
                if out_dirs is not None:
                    oparent, obase = out_dirs.parent_and_name(entry.name)
                    out = create_file(obase, dir_fd=oparent, mode=0o600)
                    fds.append(out)
                spans = [(i, raw_off, stored_off, chunk, entry.raw_length(i))
                         for i, raw_off, stored_off, chunk in entry.chunk_spans()]
                files.append(pipeline.ReadFile(chunks=spans, stored_fd=fd, out_fd=out))
            try:
                pipeline.read_files(files, workers=self._workers, on_bytes=tracker.counter if tracker else None)
            except pipeline.ChunkError as exc:
                entry = entries[exc.file_index]
                raise ImageCorrupt(f"{path / entry.stored_name} chunk {exc.chunk} at byte {exc.stored_offset} "
                                   f"{exc}") from None
        finally:
            for fd in fds:
                os.close(fd)

    @staticmethod
    def _check_listing(dfd: int, manifest: Manifest, path: Path) -> None:
        """The directory holds exactly the manifest and its files, and the manifest on disk is
        the one we hold (it was not replaced since it was read)."""
        mpath = path / MANIFEST_NAME
        try:
            listing = tree.walk(dfd, path)
            data = _read_manifest_bytes(dfd, mpath)
        except OverflowError as exc:
            raise ImageCorrupt(str(exc)) from None
        except OSError as exc:
            raise ImageCorrupt(f"{path}: {exc.strerror}") from None
        if Manifest.from_json(data, source=str(mpath)) != manifest:
            raise ImageCorrupt(f"{mpath} changed since it was read")
        for kind, found, expected in (
                ("directory", set(listing.dirs), set(manifest.dirs)),
                ("file", {name for name, _ in listing.files}, {MANIFEST_NAME} | {f.stored_name for f in manifest.files})):
            missing = sorted(expected - found)
            if missing:
                raise ImageCorrupt(f"{path / missing[0]} is missing")
            extra = sorted(found - expected)
            if extra:
                raise ImageCorrupt(f"{path} has a {kind} not in its manifest: {show(extra[0])}")

    def _check_file(self, dfd: int, entry: FileEntry, path: Path, out: int | None, tracker: _Progress | None,
                    cancelled: Callable[[], bool]) -> None:
        """Stream one stored file through size and checksum checks, writing raw bytes to `out`."""
        spath = path / entry.stored_name
        try:
            fd = open_read(entry.stored_name, dir_fd=dfd, path=spath)
        except FileNotFoundError:
            raise ImageCorrupt(f"{spath} is missing") from None
        except OSError as exc:
            raise ImageCorrupt(f"{spath}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size != entry.stored_size:
                raise ImageCorrupt(f"{spath} has {size} bytes, manifest says {entry.stored_size}")
            compression.check(fd, out, compressed=entry.compressed, size=entry.size, sha256=entry.sha256,
                              on_bytes=tracker.counter if tracker else None, cancelled=cancelled)
        except compression.Mismatch as exc:
            raise ImageCorrupt(f"{spath} {exc}") from None
        finally:
            os.close(fd)

    def _each_file(self, files: tuple[FileEntry, ...],
                   work: Callable[[FileEntry, Callable[[], bool]], None]) -> None:
        """Run `work` for every file on a bounded pool, largest first. The first failure stops
        the others at their next chunk and is raised."""
        if not files:
            return
        failed = threading.Event()
        errors: list[BaseException] = []
        lock = threading.Lock()

        def run(entry: FileEntry) -> None:
            if failed.is_set():
                return
            try:
                work(entry, failed.is_set)
            except compression.Cancelled:
                pass
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                with lock:
                    errors.append(exc)
                failed.set()

        ordered = sorted(files, key=lambda f: f.size, reverse=True)
        if len(ordered) == 1 or self._workers == 1:
            for entry in ordered:
                run(entry)
        else:
            with ThreadPoolExecutor(max_workers=min(len(ordered), self._workers),
                                    thread_name_prefix="mm-store") as pool:
                list(pool.map(run, ordered))
        if errors:
            raise errors[0]


def _read_manifest_bytes(dfd: int, mpath: Path) -> bytes:
    """The manifest of the image directory `dfd`, bounded in size; ImageCorrupt if missing."""
    try:
        fd = open_read(MANIFEST_NAME, dir_fd=dfd, path=mpath)
    except FileNotFoundError:
        raise ImageCorrupt(f"{mpath} is missing") from None
    try:
        return read_limited(fd, MAX_MANIFEST_BYTES, path=mpath)
    finally:
        os.close(fd)


def _check_ids(uid: object, gid: object) -> None:
    for what, value in (("uid", uid), ("gid", gid)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 0xFFFFFFFF:
            raise UsageError(f"{what} {show(value)} is not a user/group id")


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def _remove_quietly(name: str, dir_fd: int) -> None:
    """Best-effort cleanup on a failure path; the original error matters more."""
    try:
        remove_entry(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("could not remove %s: %s", name, exc.strerror)
