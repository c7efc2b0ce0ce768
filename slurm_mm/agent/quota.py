"""A per-user limit on the bytes a user's images take in the shared store.

Images are written by root into root-owned directories, so the filesystem's own user
quotas never see them: without this, one user's jobs (or manual checkpoints) could fill
the store every job on the cluster writes its images to. Before each dump the agent
sums what the job's owner already has in the store (the stored size of every image
whose manifest names them, all jobs, any node) minus what this checkpoint's retention
will remove (the job's images beyond the newest `keep_images - 1`); at or over
`store_quota_per_user` the checkpoint is refused, the job runs on and keeps its earlier
images. A user can exceed the quota by at most one image. 0 means no quota.

An image's stored size already holds the copies of the job's files made into it; the
pins (`<job>/.pins/<image>/`, hard links that keep a shared file's blocks alive after the
user deleted or replaced it) are outside the images and counted here too: each pinned
inode once, at its allocated size, whoever else still links it.

Only the job directories whose ACL names the user (or that have none: the group
fallback) have their manifests read. Trusts only the store's root-written directories
and manifests; never writes.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from slurm_mm.checkpointer import image_pins
from slurm_mm.config import Config
from slurm_mm.errors import QuotaExceeded, SlurmMMError
from slurm_mm.store import ImageStore, acl

log = logging.getLogger(__name__)


class StoreQuota:
    def __init__(self, store: ImageStore, limit: int, keep: int) -> None:
        self.store = store
        self.limit = limit
        self.keep = keep

    def check(self, job_id: str, uid: int) -> None:
        """QuotaExceeded when uid's images that would outlive this checkpoint reach the limit."""
        if self.limit <= 0 or uid == 0:
            return
        used = self.usage(uid, leaving=job_id)
        if used >= self.limit:
            raise QuotaExceeded(f"uid {uid} has {_mib(used)} of images in the store, at or over its quota of "
                                f"{_mib(self.limit)} (store_quota_per_user): no new image of job {job_id}; "
                                "it keeps its earlier ones")

    def usage(self, uid: int, leaving: str | None = None) -> int:
        """Stored bytes of uid's images; for job `leaving`, only its newest keep-1 (the rest
        go with the next commit's retention)."""
        root = Path(self.store.root)
        try:
            jobs = [name for name in os.listdir(root) if name.isdigit()]
        except FileNotFoundError:
            return 0
        total = 0
        pinned: set[tuple[int, int]] = set()
        for job in jobs:
            users = _named_users(root / job)
            if users is None or (users and uid not in users):
                continue
            try:
                images = self.store.images(job)  # newest first
            except (SlurmMMError, OSError) as exc:
                log.debug("quota: cannot list job %s: %s", job, exc)
                continue
            if images and all(i.manifest.uid != uid for i in images) or not images and not users:
                continue  # the job is someone else's (or, with neither ACL nor image, no one's known)
            pins: set[str] | None = None  # every pin directory: a later commit prunes the unused
            if job == leaving:
                images = images[:max(0, self.keep - 1)]
                pins = {p for i in images for p in image_pins(i.manifest.extra)}
            total += sum(i.manifest.stored_size for i in images if i.manifest.uid == uid)
            total += pin_bytes(root / job / PIN_DIR, pins, pinned)
        return total


PIN_DIR = ".pins"


def pin_bytes(pin_root: Path, names: set[str] | None, seen: set[tuple[int, int]]) -> int:
    """Allocated bytes of the pinned files under pin_root (only the pin directories in
    `names`, or all when None), each inode once across calls sharing `seen`.
    Pin directories are root's 0700: nothing in them is followed."""
    total = 0
    try:
        entries = [e for e in os.scandir(pin_root) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return 0
    for entry in entries:
        if names is not None and entry.name not in names:
            continue
        try:
            files = list(os.scandir(entry.path))
        except OSError:
            continue
        for pin in files:
            try:
                st = pin.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def check(cfg: Config, store: ImageStore, job_id: str, uid: int) -> None:
    """Before a dump of job_id (owner uid): QuotaExceeded at or over the site's quota."""
    if cfg.store_quota_per_user > 0:
        StoreQuota(store, cfg.store_quota_per_user, cfg.keep_images).check(job_id, uid)


def _named_users(path: Path) -> set[int] | None:
    """The users a job directory's ACL names (empty: none, the group fallback); None when it
    is not a directory we can open without following a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return set(acl.named_users(fd) or ())
    except (OSError, ValueError):
        return set()
    finally:
        os.close(fd)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
