"""What the image-level commands share: the caller's job directory, root, the store."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from slurm_mm import config
from slurm_mm.checkpointer import open_store
from slurm_mm.errors import NoImage, PermissionDenied, UnsafePath, UsageError
from slurm_mm.store import ImageStore
from slurm_mm.store.safe_fs import name_problem


def job_dir(text: str, *, must_exist: bool) -> tuple[Path, str]:
    """(store root, job id) of a job directory path typed by the caller."""
    path = Path(text)
    if ".." in path.parts:
        raise UsageError(f"'{text}' must not contain '..'")
    path = path.absolute()
    if not path.name:
        raise UsageError(f"'{text}' is not a job directory")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise UnsafePath(f"{path} is a symlink; give the real directory")
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path} is not a directory")
    if st is None and must_exist:
        raise NoImage(f"{path} does not exist")
    problem = name_problem(path.name, kind="job id")
    if problem:
        raise UsageError(f"{path}: the directory's name is the images' job id, and {problem}")
    return path.parent, path.name


def store_and_job(text: str) -> tuple[ImageStore, str]:
    """A job id (under the configured root) or a job directory path."""
    cfg = config.load()
    if text.isdigit():
        return open_store(cfg), text
    root, job = job_dir(text, must_exist=True)
    return open_store(cfg, root), job


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise PermissionDenied(f"{what} needs root (CRIU)")
