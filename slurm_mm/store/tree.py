"""Directory trees below an image, a source or a destination, walked by file descriptors.

An image directory may hold subdirectories (files a job had open, saved beside CRIU's
image). Every directory is reached from its parent's fd with O_NOFOLLOW and checked like
the top one (safe_fs.open_dir: root's, writable by nobody else); every name is one safe
component. Only regular files and directories are accepted: a symlink, device, FIFO or
socket anywhere is refused by name. Never resolves a path below the top as a string.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from slurm_mm.errors import UnsafePath
from slurm_mm.store.manifest import MAX_DEPTH, MAX_DIRS, MAX_FILES, path_problem
from slurm_mm.store.safe_fs import make_dir, name_problem, open_dir


@dataclass(frozen=True)
class Listing:
    """What a tree holds: directories (parents first) and regular files with sizes, as
    paths relative to its top, sorted."""

    dirs: tuple[str, ...]
    files: tuple[tuple[str, int], ...]


def walk(top_fd: int, top: Path) -> Listing:
    """List the tree below `top_fd`. UnsafePath naming the entry for a symlink, anything
    that is not a regular file or directory, a bad name, or a tree too deep or too large."""
    dirs: list[str] = []
    files: list[tuple[str, int]] = []

    def visit(dfd: int, rel: str, depth: int) -> None:
        for name in sorted(os.listdir(dfd)):
            path = f"{rel}/{name}" if rel else name
            problem = name_problem(name)
            if problem:
                raise UnsafePath(f"{top / rel if rel else top}: {problem}")
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise UnsafePath(f"{top / path} is a symlink")
            if stat.S_ISDIR(st.st_mode):
                if depth + 1 >= MAX_DEPTH:
                    raise UnsafePath(f"{top / path} is more than {MAX_DEPTH} directories deep")
                dirs.append(path)
                if len(dirs) > MAX_DIRS:
                    raise UnsafePath(f"{top} holds more than {MAX_DIRS} directories")
                sub = open_dir(name, dir_fd=dfd, path=top / path)
                try:
                    visit(sub, path, depth + 1)
                finally:
                    os.close(sub)
            elif stat.S_ISREG(st.st_mode):
                problem = path_problem(path)
                if problem:
                    raise UnsafePath(f"{top}: {problem}")
                files.append((path, st.st_size))
                if len(files) > MAX_FILES:
                    raise UnsafePath(f"{top} holds more than {MAX_FILES} files")
            else:
                raise UnsafePath(f"{top / path} is not a regular file or a directory")

    visit(top_fd, "", 0)
    return Listing(dirs=tuple(dirs), files=tuple(files))


class DirFds:
    """Open directories below one top directory fd, by relative path, each opened from its
    parent without following links and checked. Close with close()."""

    def __init__(self, top_fd: int, top: Path) -> None:
        self.top = top
        self._fds: dict[str, int] = {"": top_fd}
        self._owned: list[int] = []

    def fd(self, rel_dir: str) -> int:
        """The fd of directory `rel_dir` ('' is the top)."""
        found = self._fds.get(rel_dir)
        if found is not None:
            return found
        parent, _, name = rel_dir.rpartition("/")
        fd = open_dir(name, dir_fd=self.fd(parent), path=self.top / rel_dir)
        self._fds[rel_dir] = fd
        self._owned.append(fd)
        return fd

    def make(self, rel_dir: str, mode: int) -> int:
        """Create directory `rel_dir` (its parent must exist or have been made) and open it."""
        parent, _, name = rel_dir.rpartition("/")
        fd = make_dir(name, dir_fd=self.fd(parent), mode=mode, path=self.top / rel_dir)
        self._fds[rel_dir] = fd
        self._owned.append(fd)
        return fd

    def parent_and_name(self, rel_path: str) -> tuple[int, str]:
        """(fd of the directory holding `rel_path`, its last component)."""
        parent, _, name = rel_path.rpartition("/")
        return self.fd(parent), name

    def opened(self) -> list[int]:
        """Every directory fd opened so far, the top first (to fsync them all)."""
        return [self._fds[""], *self._owned]

    def close(self) -> None:
        for fd in self._owned:
            os.close(fd)
        self._owned.clear()
        self._fds = {"": self._fds[""]}

