"""Where a dump is written before the store compresses it: node-local staging if it fits.

Async checkpoints dump to node-local staging (tmpfs or local disk), the job runs on, and
the store compresses and writes the image to the shared filesystem in the background.
When staging space is short for the tree's memory, the dump goes to a root-only
directory on the shared filesystem instead ("direct" mode): slower to write, but it
never fails for want of local space.

Root writes images here and CRIU restores from here, so nobody but root may be able to
create, rename or replace anything on the way: prepare_staging_root() (at agent start)
makes sure every directory from / down to the staging directory is root's and not
writable by others (a sticky directory such as /var/tmp is fine: others cannot rename
root's entries in it), that none is a symlink, and that the staging directory itself is
root's with mode 0700. From then on, paths below it cannot change under root's feet:
that property, not checks at each use, is what makes path-based access there safe.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path

from slurm_mm.errors import ConfigError, PermissionDenied

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


def tree_gpu_bytes(pids: list[int]) -> int:
    """GPU memory the tree holds: its image carries that too (the GPU checkpoint moves it
    into the job's host memory after the staging is chosen, so RSS alone undercounts)."""
    try:
        from slurm_mm.engine.gpu_inventory import process_gpu_memory  # noqa: PLC0415

        used = process_gpu_memory()
    except Exception:  # noqa: BLE001 - no NVML, no nvidia-smi: no GPU state to count
        return 0
    return sum(used.get(pid, 0) for pid in pids)


def memory_allows(needed: int, min_free_ratio: float) -> bool:
    """`needed` more bytes of RAM leave `min_free_ratio` of it available (MemAvailable)."""
    info: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(":")
                info[key] = int(value.split()[0]) * 1024
        return info["MemAvailable"] - needed >= info["MemTotal"] * min_free_ratio
    except (OSError, KeyError, ValueError, IndexError):
        return False


def gpu_dump_dir(top: Path, job_id: str, name: str, needed: int, gpu_bytes: int,
                 min_free_ratio: float, *, create: bool = True) -> Path | None:
    """A GPU job's dump directory in `top` (a tmpfs: the dump runs at memory speed and the
    commit reads it back from memory) when the image fits there and in RAM beside the
    job's GPU state, which sits in its host memory while checkpointed (`gpu_bytes` more).
    None when it does not fit, or when `top` is not a root-only directory (it may sit in
    a world-writable /dev/shm: a user could have made it first). Also used for a GPU
    image's restore (create=False: the store creates the directory itself)."""
    try:
        top.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(top)
    except OSError as exc:
        log.warning("GPU staging %s unusable: %s", top, exc.strerror)
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
        log.warning("GPU staging %s is not a root-only directory: not used", top)
        return None
    if not (fits(top, needed, min_free_ratio) and memory_allows(needed + gpu_bytes, min_free_ratio)):
        return None
    return root_only_dir(top / job_id / name, create=create)


def _check_ancestor(where: str, st: os.stat_result) -> None:
    if st.st_uid != 0:
        raise PermissionDenied(f"{where} belongs to uid {st.st_uid}, not root: it cannot hold root's staging")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise PermissionDenied(f"{where} is writable by others and not sticky: it cannot hold root's staging")


def prepare_staging_root(path: Path) -> None:
    """Create `path` (root, 0700) or check it; PermissionDenied naming what is wrong.

    Every directory from / down is opened without following symlinks and must be
    root's and not writable by others unless sticky; `path` itself must be root's and
    is tightened to 0700 (refused if others could write in it: they may have put
    something there).
    """
    if not path.is_absolute() or ".." in path.parts:
        raise ConfigError(f"staging_dir {path} must be an absolute path without '..'")
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        here = "/"
        for i, name in enumerate(path.parts[1:]):
            last = i == len(path.parts) - 2
            _check_ancestor(here, os.fstat(fd))
            here = os.path.join(here, name)
            try:
                st = os.lstat(name, dir_fd=fd)
            except FileNotFoundError:
                os.mkdir(name, 0o700 if last else 0o755, dir_fd=fd)
                st = os.lstat(name, dir_fd=fd)
            if stat.S_ISLNK(st.st_mode):
                raise PermissionDenied(f"staging_dir {path}: {here} is a symlink")
            if not stat.S_ISDIR(st.st_mode):
                raise PermissionDenied(f"staging_dir {path}: {here} is not a directory")
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
        st = os.fstat(fd)
        if st.st_uid != 0:
            raise PermissionDenied(f"staging_dir {path} belongs to uid {st.st_uid}, not root "
                                   "(someone else made it first?): remove it and start the agent again")
        if st.st_mode & 0o022:
            raise PermissionDenied(f"staging_dir {path} is writable by others (mode {st.st_mode & 0o7777:o}): "
                                   "remove it and start the agent again")
        if st.st_mode & 0o7777 != 0o700:
            log.info("staging_dir %s: mode %o -> 700", path, st.st_mode & 0o7777)
            os.fchmod(fd, 0o700)
    except OSError as exc:
        raise PermissionDenied(f"staging_dir {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
