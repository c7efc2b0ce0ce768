"""Where a dump is written before the store compresses it: node-local staging if it fits.

Async checkpoints dump to node-local staging (tmpfs or local disk), the job runs on, and
the store compresses and writes the image to the shared filesystem in the background.
When staging space is short for the tree's memory, the dump goes to a root-only
directory on the shared filesystem instead ("direct" mode): slower to write, but it
never fails for want of local space.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path

from slurm_mm.errors import PermissionDenied

log = logging.getLogger(__name__)


def tree_resident_bytes(pids: list[int]) -> int:
    """Resident memory of the tree: what a CRIU image of it roughly weighs."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(("RssAnon:", "RssShmem:")):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            continue
    return total


def fits(directory: Path, needed: int, min_free_ratio: float) -> bool:
    """`needed` bytes fit in `directory` while leaving `min_free_ratio` of it free."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    free = st.f_bavail * st.f_frsize
    return free - needed >= st.f_blocks * st.f_frsize * min_free_ratio


def root_only_dir(path: Path, *, create: bool = True) -> Path:
    """A fresh directory `path` under a root-owned, root-only parent."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.lstat(path.parent)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
        raise PermissionDenied(f"staging directory {path.parent} must be a root-only directory")
    if path.exists():
        shutil.rmtree(path)  # a leftover of a crashed agent
    if create:
        path.mkdir(mode=0o700)
    return path
