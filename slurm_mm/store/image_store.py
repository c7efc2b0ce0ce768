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
          <file>.zst | <file>.raw

What it guarantees: an image is either complete and verified or invisible (written under
.tmp-*, fsynced, read back and checked, then renamed); a writer whose epoch is below the
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
import stat
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
from slurm_mm.store import acl, compression
from slurm_mm.store.manifest import FORMAT_VERSION, MANIFEST_NAME, MAX_MANIFEST_BYTES, FileEntry, Manifest
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
_MAX_WORKERS = 8

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
                 lock_timeout: float = 60.0) -> None:
        """level: zstd level (1-22); threads: zstd workers and restore parallelism, 0 = one
        per CPU; keep: complete images kept per job; lock_timeout: seconds a writer waits for
        another before StoreBusy."""
        if isinstance(level, bool) or not isinstance(level, int) \
                or not 1 <= level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise ConfigError(f"compression level {show(level)} is not in 1-{zstandard.MAX_COMPRESSION_LEVEL}")
        if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= 256:
            raise ConfigError(f"compression threads {show(threads)} is not in 0-256")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"images to keep {show(keep)} is not a positive integer")
        if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)) or not lock_timeout >= 0:
            raise ConfigError(f"lock timeout {show(lock_timeout)} is not a number of seconds >= 0")
        self.root = Path(root)
        self.level = level
        self.threads = threads
        self.keep = keep
        self.lock_timeout = float(lock_timeout)
        self._workers = min(_MAX_WORKERS, threads or os.cpu_count() or 1)
        self._warned_no_acl = False

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
               extra: dict[str, Any] | None = None, progress: Progress | None = None) -> Image:
        """Store the files of `source_dir` (flat, regular files) as the job's newest image.

        Atomic: the image becomes visible only once written, fsynced and verified. Raises
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
        with self._io(f"job {job_id}: writing an image"), self._root_fd(create=True) as rfd:
            jfd = self._job_fd(rfd, job_id, owner=(uid, gid))
            try:
                return self._commit(jfd, job_id, source, meta, progress)  # type: ignore[arg-type]
            finally:
                os.close(jfd)  # type: ignore[arg-type]

    def _commit(self, jfd: int, job_id: str, source: Path, meta: dict[str, Any],
                progress: Progress | None) -> Image:
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
                manifest = self._write_image(jfd, job_id, tmp, source, meta, progress)
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
                     progress: Progress | None) -> Manifest:
        uid, gid = meta["uid"], meta["gid"]
        tmp_path = self.root / job_id / tmp
        sfd = open_dir(source, dir_fd=None, path=source)
        try:
            sources = _source_files(sfd, source)
            tfd = make_dir(tmp, dir_fd=jfd, mode=0o750, path=tmp_path)
            try:
                _phase("tmp-created")
                self._grant(tfd, uid, gid, directory=True, path=tmp_path)
                tracker = _Progress(sum(size for _, size in sources), progress)
                entries = []
                for name, _size in sources:
                    entries.append(self._store_file(sfd, tfd, name, source, uid, gid, tracker))
                    _phase("file-written")
                manifest = Manifest(**{**meta, "files": tuple(entries)})
                mfd = create_file(MANIFEST_NAME, dir_fd=tfd, mode=0o640)
                try:
                    self._grant(mfd, uid, gid, directory=False, path=tmp_path)
                    write_all(mfd, manifest.to_json().encode())
                    os.fsync(mfd)
                finally:
                    os.close(mfd)
                _phase("manifest-written")
                os.fsync(tfd)
                _phase("synced")
                # Read everything back as a restore would, so a bad write is caught now.
                self._verify_dir(tfd, manifest, tmp_path)
                _phase("verified")
                return manifest
            finally:
                os.close(tfd)
        finally:
            os.close(sfd)

    def _store_file(self, sfd: int, tfd: int, name: str, source: Path, uid: int, gid: int,
                    tracker: _Progress) -> FileEntry:
        src = open_read(name, dir_fd=sfd, path=source / name, check_owner=False)
        try:
            compress = compression.worth_compressing(src, self.level)
            stored_name = name + (".zst" if compress else ".raw")
            dst = create_file(stored_name, dir_fd=tfd, mode=0o640)
            try:
                self._grant(dst, uid, gid, directory=False, path=source)
                result = compression.store(src, dst, compress=compress, level=self.level, threads=self.threads,
                                           on_bytes=tracker.counter)
                os.fsync(dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        return FileEntry(name=name, size=result.size, stored_size=result.stored_size, sha256=result.sha256,
                         compressed=compress)

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
        symlink, every size and SHA-256 right. Raises ImageCorrupt (UnsafePath for a symlink
        or a file writable by others)."""
        with self._image_fd(image) as dfd:
            self._verify_dir(dfd, image.manifest, image.path)

    def extract(self, image: Image, dest: Path | str, progress: Progress | None = None) -> Manifest:
        """Decompress the image into the new directory `dest` (mode 0700), checking every size
        and checksum on the way. `dest` appears only when everything checked out; on
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
                    try:
                        self._check_listing(dfd, image.manifest, image.path)
                        tracker = _Progress(image.manifest.total_size, progress)

                        def extract_one(entry: FileEntry, cancelled: Callable[[], bool]) -> None:
                            out = create_file(entry.name, dir_fd=tfd, mode=0o600)
                            try:
                                self._check_file(dfd, entry, image.path, out, tracker, cancelled)
                            finally:
                                os.close(out)

                        self._each_file(image.manifest.files, extract_one)
                        os.rename(tmp, dest.name, src_dir_fd=pfd, dst_dir_fd=pfd)
                    except BaseException:
                        _remove_quietly(tmp, pfd)
                        raise
                    finally:
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
        self._each_file(manifest.files,
                        lambda entry, cancelled: self._check_file(dfd, entry, path, None, None, cancelled))

    @staticmethod
    def _check_listing(dfd: int, manifest: Manifest, path: Path) -> None:
        """The directory holds exactly the manifest and its files, and the manifest on disk is
        the one we hold (it was not replaced since it was read)."""
        mpath = path / MANIFEST_NAME
        try:
            names = set(os.listdir(dfd))
            data = _read_manifest_bytes(dfd, mpath)
        except OverflowError as exc:
            raise ImageCorrupt(str(exc)) from None
        except OSError as exc:
            raise ImageCorrupt(f"{path}: {exc.strerror}") from None
        if Manifest.from_json(data, source=str(mpath)) != manifest:
            raise ImageCorrupt(f"{mpath} changed since it was read")
        expected = {MANIFEST_NAME} | {f.stored_name for f in manifest.files}
        missing = sorted(expected - names)
        if missing:
            raise ImageCorrupt(f"{path / missing[0]} is missing")
        extra = sorted(names - expected)
        if extra:
            raise ImageCorrupt(f"{path} has a file not in its manifest: {show(extra[0])}")

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


def _source_files(sfd: int, source: Path) -> list[tuple[str, int]]:
    """(name, size) of the files to store, sorted; refuses anything but flat regular files."""
    result = []
    for name in sorted(os.listdir(sfd)):
        problem = name_problem(name)
        if problem:
            raise UnsafePath(f"{source}: {problem}")
        st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePath(f"{source / name} is a symlink")
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(f"{source / name} is not a regular file")
        result.append((name, st.st_size))
    if not result:
        raise ImageError(f"{source} holds no files to store")
    return result


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
