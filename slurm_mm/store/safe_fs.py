"""Safe file access for root-run store code.

What it trusts: the checkpoint root path as configured by the admin (its parent components
are followed like any admin-chosen path). Everything below the root is reached through
directory file descriptors (openat-style, `dir_fd=`) with O_NOFOLLOW, and every directory
is checked to belong to root (or to the calling user, for a user reading their own images)
and to be writable by nobody else. A name is one path component from a whitelist.

What it must never do: resolve a path below the root as a string, follow a symlink, or
accept a name containing `/`, `..` or control characters. A user who can write anywhere
in the chain could otherwise steer root's reads and writes to any file on the node.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
from pathlib import Path

from slurm_mm.errors import PermissionDenied, UnsafePath

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted where a file is expected must not hang root.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# Slurm job ids: 1234, 1234_7 (array), 1234+1 (het). A leading '.' is reserved for the
# store's own temporary names, so no job id or file name may start with one.
_JOB_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")
# CRIU image names (pages-1.img, core-42.img) and the engine's own files.
_FILE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=,@:-]{0,199}")


def show(value: object, limit: int = 60) -> str:
    """repr() of a value, cut short so a hostile value still makes a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def name_problem(name: object, *, kind: str = "file name") -> str | None:
    """Why `name` is not an acceptable single path component, or None if it is."""
    if kind == "job id":
        pattern, allowed = _JOB_ID_RE, "[A-Za-z0-9_.+-]"
    else:
        pattern, allowed = _FILE_NAME_RE, "[A-Za-z0-9_.+=,@:-]"
    if not isinstance(name, str):
        return f"{kind} {show(name)} is not a string"
    if name.startswith("/"):
        return f"{kind} {show(name)} is an absolute path"
    if "/" in name:
        return f"{kind} {show(name)} contains '/'"
    if name in (".", ".."):
        return f"{kind} {show(name)} is a '{name}' component"
    if not pattern.fullmatch(name):
        return f"{kind} {show(name)} is empty, too long, starts with '.' or has characters outside {allowed}"
    return None


def check_name(name: object, *, kind: str = "file name") -> str:
    """Return `name` if it is one safe path component; raise UnsafePath naming it otherwise."""
    problem = name_problem(name, kind=kind)
    if problem:
        raise UnsafePath(problem)
    return name  # type: ignore[return-value]


def trusted_uids() -> frozenset[int]:
    """Owners whose files we may act on: root, and ourselves when not root."""
    return frozenset({0, os.geteuid()})


def check_trusted(st: os.stat_result, path: Path | str) -> None:
    """Refuse an inode that someone other than root (or us) owns or can write."""
    if st.st_uid not in trusted_uids():
        raise UnsafePath(f"{path} is owned by uid {st.st_uid}, not root")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafePath(f"{path} is group/other-writable (mode {stat.S_IMODE(st.st_mode):04o})")


def _refuse_open_error(exc: OSError, name: str, dir_fd: int | None, path: Path | str) -> None:
    """Turn ELOOP/ENOTDIR from an O_NOFOLLOW open into UnsafePath; re-raise the rest."""
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            raise exc from None
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePath(f"{path} is a symlink") from None
        raise UnsafePath(f"{path} is not a {'directory' if exc.errno == errno.ENOTDIR else 'regular file'}") from None
    raise exc


def open_dir(name: str | Path, *, dir_fd: int | None, path: Path | str, search_only: bool = False) -> int:
    """Open directory `name` (relative to dir_fd) without following a symlink; check its owner/mode.

    `path` is only used in messages. search_only: a directory we may search but not read
    (the 0711 checkpoint root, for a job's owner) is opened O_PATH, good as a dir_fd only.
    PermissionDenied if we may not read it.
    """
    try:
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
        except PermissionError:
            if not search_only:
                raise
            fd = os.open(name, PATH_FLAGS, dir_fd=dir_fd)
    except PermissionError:
        raise PermissionDenied(f"{path}: permission denied") from None
    except OSError as exc:
        _refuse_open_error(exc, str(name), dir_fd, path)
        raise
    try:
        check_trusted(os.fstat(fd), path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_read(name: str, *, dir_fd: int, path: Path | str, check_owner: bool = True) -> int:
    """Open a regular file for reading without following a symlink.

    check_owner: also refuse a file not owned by root or writable by others (image files);
    the engine's source files are protected by their trusted directory instead.
    """
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    except PermissionError:
        raise PermissionDenied(f"{path}: permission denied") from None
    except OSError as exc:
        _refuse_open_error(exc, name, dir_fd, path)
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(f"{path} is not a regular file")
        if check_owner:
            check_trusted(st, path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_file(name: str, *, dir_fd: int, mode: int) -> int:
    """Create a new file exclusively (never reuse or follow an existing name) with `mode`."""
    fd = os.open(name, CREATE_FLAGS, 0o600, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_dir(name: str, *, dir_fd: int, mode: int, path: Path | str) -> int:
    """Create a new directory (0700 first, so it is never wider than `mode`) and open it."""
    os.mkdir(name, 0o700, dir_fd=dir_fd)
    fd = open_dir(name, dir_fd=dir_fd, path=path)
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_limited(fd: int, limit: int, *, path: Path | str) -> bytes:
    """Read a whole small file, refusing one over `limit` bytes (a hostile file must not eat memory)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = os.read(fd, min(1 << 20, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise OverflowError(f"{path} is larger than {limit} bytes")


def write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until everything is written (short writes happen on network filesystems)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def remove_entry(name: str, *, dir_fd: int) -> None:
    """Remove a file or a whole tree below dir_fd, never following symlinks."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        # rmtree with dir_fd walks by file descriptors: a symlink swapped in mid-way is unlinked,
        # never followed (shutil.rmtree.avoids_symlink_attacks on Linux).
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


__all__ = [
    "check_name",
    "check_trusted",
    "create_file",
    "make_dir",
    "name_problem",
    "open_dir",
    "open_read",
    "read_limited",
    "remove_entry",
    "show",
    "trusted_uids",
    "write_all",
]
