"""Closed files in a job's node-local scratch directories, found for its file state.

A script that writes `$TMPDIR/a.out`, closes it and reads it in a later step needs that
file on whichever node it resumes, though no process holds it at the image. Only
directories the job's owner owns are walked (a per-job `$TMPDIR`, a node-local directory
the tree works in; never a shared root such as /tmp itself), and only the owner's own
regular files, readable by the owner, are taken: root copies nothing the owner could not
read, and never follows a link (every step is an `openat` with O_NOFOLLOW from the
directory's fd). The walk is bounded: it runs while the tree is frozen.
"""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

MAX_ENTRIES = 10000  # directory entries looked at per image, all roots together
MAX_DEPTH = 4


@dataclass(frozen=True)
class ClosedFile:
    """A file found in a scratch directory, open (O_RDONLY) while the capture runs."""

    path: str
    handle: str  # /proc/self/fd/N
    st: os.stat_result


@dataclass
class _Walk:
    uid: int
    skip: set[tuple[int, int]]
    fds: list[int]
    found: list[ClosedFile]
    left: int
    truncated: bool = False


def _open_dir(name: str, dir_fd: int | None, follow: bool = False) -> int | None:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError:
        return None


def _open_no_links(path: str) -> int | None:
    """The directory at absolute `path`, refused if any component of it is a symlink."""
    if not path.startswith("/"):
        return None
    fd = _open_dir("/", None, follow=True)
    for part in [p for p in path.split("/") if p]:
        if fd is None:
            return None
        sub = _open_dir(part, fd) if part not in (".", "..") else None
        os.close(fd)
        fd = sub
    return fd


def _walk(walk: _Walk, dir_fd: int, path: str, depth: int) -> None:
    try:
        names = sorted(os.listdir(dir_fd))
    except OSError:
        return
    for name in names:
        if walk.left <= 0:
            walk.truncated = True
            return
        walk.left -= 1
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            continue
        if st.st_uid != walk.uid:
            continue
        child = os.path.join(path, name)
        if stat.S_ISDIR(st.st_mode) and depth < MAX_DEPTH:
            sub = _open_dir(name, dir_fd)
            if sub is not None:
                try:
                    _walk(walk, sub, child, depth + 1)
                finally:
                    os.close(sub)
        elif stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in walk.skip:
            _take(walk, dir_fd, name, child)


def _take(walk: _Walk, dir_fd: int, name: str, path: str) -> None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != walk.uid or not st.st_mode & stat.S_IRUSR:
        os.close(fd)
        return
    walk.fds.append(fd)
    walk.skip.add((st.st_dev, st.st_ino))
    walk.found.append(ClosedFile(path, f"/proc/self/fd/{fd}", st))


@contextmanager
def closed_files(roots: Iterable[tuple[str, str]], uid: int,
                 skip: set[tuple[int, int]]) -> Iterator[tuple[list[ClosedFile], bool]]:
    """The owner's files under each (path, handle) root the owner owns, skipping inodes in
    `skip` (files the tree holds, its stdio); yields (files, whether the walk was cut short).
    `handle` opens the exact directory (e.g. /proc/PID/cwd), `path` is how the job names it."""
    walk = _Walk(uid=uid, skip=set(skip), fds=[], found=[], left=MAX_ENTRIES)
    seen_roots: set[tuple[int, int]] = set()
    try:
        for path, handle in roots:
            # /proc/PID/cwd is the exact directory the task is in; a path from the job's
            # environment is walked from / one component at a time, never through a link.
            fd = _open_dir(handle, None, follow=True) if handle.startswith("/proc/") else _open_no_links(path)
            if fd is None:
                continue
            try:
                st = os.fstat(fd)
                if st.st_uid == uid and (st.st_dev, st.st_ino) not in seen_roots:
                    seen_roots.add((st.st_dev, st.st_ino))
                    _walk(walk, fd, path, 1)
            finally:
                os.close(fd)
        yield walk.found, walk.truncated
    finally:
        for fd in walk.fds:
            os.close(fd)
