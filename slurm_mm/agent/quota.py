"""A per-user limit on the bytes a user's images take in the shared store.

Images are written by root into root-owned directories, so the filesystem's own user
quotas never see them: without this, one user's jobs (or manual checkpoints) could fill
the store every job on the cluster writes its images to. Before each dump the agent
sums what the job's owner already has in the store (the stored size of every image
whose manifest names them, all jobs, any node) minus what this checkpoint's retention
will remove (the job's images beyond the newest `keep_images - 1`); at or over
`store_quota_per_user` the checkpoint is refused, the job runs on and keeps its earlier
images. A user can exceed the quota by at most one image. 0 means no quota.

Only the job directories whose ACL names the user (or that have none: the group
fallback) have their manifests read. Trusts only the store's root-written directories
and manifests; never writes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

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
        for job in jobs:
            if not _may_hold(root / job, uid):
                continue
            try:
                images = self.store.images(job)  # newest first
            except (SlurmMMError, OSError) as exc:
                log.debug("quota: cannot list job %s: %s", job, exc)
                continue
            if job == leaving:
                images = images[:max(0, self.keep - 1)]
            total += sum(i.manifest.stored_size for i in images if i.manifest.uid == uid)
        return total


def check(cfg: Config, store: ImageStore, job_id: str, uid: int) -> None:
    """Before a dump of job_id (owner uid): QuotaExceeded at or over the site's quota."""
    if cfg.store_quota_per_user > 0:
        StoreQuota(store, cfg.store_quota_per_user, cfg.keep_images).check(job_id, uid)


def _may_hold(path: Path, uid: int) -> bool:
    """Whether a job directory may hold uid's images: its ACL names uid, or it has no named user."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        users = acl.named_users(fd)
    except (OSError, ValueError):
        return True
    finally:
        os.close(fd)
    return not users or uid in users


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
