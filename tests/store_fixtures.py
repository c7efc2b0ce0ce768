"""Fixtures and helpers shared by the tests/test_store_*.py files (real files, no mocks)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from slurm_mm.store import Image, ImageStore

OWNER = "mmtest"   # the job's owner in permission tests
OTHER = "mmother"  # any other unprivileged user

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the store's permission model needs root")


def ensure_user(name: str) -> pwd.struct_passwd:
    """Create an unprivileged user if absent; tolerate a parallel creator."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return pwd.getpwnam(name)


def run_as(user: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", user, "--", *argv], capture_output=True, text=True, timeout=20)


@pytest.fixture(scope="session")
def owner() -> pwd.struct_passwd:
    return ensure_user(OWNER)


@pytest.fixture(scope="session")
def other() -> pwd.struct_passwd:
    return ensure_user(OTHER)


@pytest.fixture()
def base():
    """A root-owned 0711 directory in /tmp: pytest's own tmp_path is 0700, which would stop
    the unprivileged users of the permission tests before the store's own checks."""
    path = Path(tempfile.mkdtemp(prefix="slurm_mm-store-", dir="/tmp"))
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture()
def store(base: Path) -> ImageStore:
    return ImageStore(base / "ckpt", keep=3, threads=2, lock_timeout=5)


def source(base: Path, files: dict[str, bytes], name: str = "src") -> Path:
    """A CRIU-like image directory holding `files`, as the engine would leave it."""
    path = base / name
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(mode=0o700)
    for fname, data in files.items():
        (path / fname).write_bytes(data)
    return path


def commit(store: ImageStore, job: str, src: Path, *, epoch: int = 0, uid: int = 0, gid: int = 0,
           **kwargs) -> Image:
    args = dict(node="n1", trigger="periodic", gpu=None, criu_version="4.2.1", extra={})
    args.update(kwargs)
    return store.commit(job, src, epoch=epoch, uid=uid, gid=gid, **args)


def job_entries(store: ImageStore, job: str) -> list[str]:
    return sorted(os.listdir(store.root / job))


def tmp_entries(store: ImageStore, job: str) -> list[str]:
    return [n for n in job_entries(store, job) if n.startswith(".tmp-")]
