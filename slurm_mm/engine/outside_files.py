"""Files a tree holds from outside its own mount namespace.

CRIU cannot dump a file whose mount it cannot find in the tree's mount namespace (`Can't
lookup mount=N`): such files are dumped as external (`--external file[MNT:INO]`) and
handed back at restore. Used by the dump (engine/checkpoint.py) and by the file state
capture, which saves their content (engine/filestate.py).
"""

from __future__ import annotations

import os
from typing import Sequence

from slurm_mm.engine import proctree
from slurm_mm.engine.criu import external_file_key


def own_mount_ns(pid: int) -> bool:
    """Whether `pid` lives in another mount namespace than this process."""
    try:
        theirs, ours = os.stat(f"/proc/{pid}/ns/mnt"), os.stat("/proc/self/ns/mnt")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino)


def _mount_ids(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="replace") as f:
            return {int(line.split(maxsplit=1)[0]) for line in f if line.strip()}
    except (FileNotFoundError, ProcessLookupError):
        return set()


def _fd_mount_id(pid: int, fd: int) -> int | None:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return None


def outside_files(init_pid: int, pids: Sequence[int]) -> dict[tuple[int, int], tuple[str, str]]:
    """Files open in the tree whose mount is not in its mount namespace.

    (host pid, fd) -> (CRIU external key, path). Only what CRIU dumps by path (regular
    files, deleted ones too, directories, devices other than terminals); pipes, sockets,
    memfds and the like live on kernel-internal mounts and are dumped otherwise. A tree
    in this process's mount namespace has none (and its fds are not walked).
    """
    if not own_mount_ns(init_pid):
        return {}
    inside = _mount_ids(init_pid)
    found: dict[tuple[int, int], tuple[str, str]] = {}
    if not inside:
        return found
    for pid in pids:
        try:
            fds = [int(fd) for fd in os.listdir(f"/proc/{pid}/fd")]
        except (FileNotFoundError, ProcessLookupError):
            continue
        for fd in fds:
            f = proctree.open_file(pid, fd)
            if f is None or f.kind not in ("file", "deleted") or f.target.startswith("/memfd:"):
                continue
            mnt = _fd_mount_id(pid, fd)
            if mnt is None or mnt in inside:
                continue
            try:
                ino = os.stat(f"/proc/{pid}/fd/{fd}").st_ino
            except (FileNotFoundError, ProcessLookupError):
                continue
            found[(pid, fd)] = (external_file_key(mnt, ino), f.target)
    return found
