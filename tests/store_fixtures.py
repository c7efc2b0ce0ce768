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


def write_format1_image(store: ImageStore, job: str, files: dict[str, bytes], *, seq: int = 1,
                        compress: tuple[str, ...] = ()) -> Path:
    """An image exactly as the store wrote them before chunking (format 1): flat, one zstd
    stream or raw bytes per file, a SHA-256 of each file's raw bytes. Built by hand here so
    that the test does not depend on the store's current writer."""
    import hashlib
    import json

    import zstandard

    store.prepare_job(job, 0, 0)
    path = store.root / job / f"ckpt-{seq:06d}"
    path.mkdir(mode=0o750)
    entries = []
    for name, data in sorted(files.items()):
        packed = name in compress
        stored = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data) if packed else data
        (path / (name + (".zst" if packed else ".raw"))).write_bytes(stored)
        os.chmod(path / (name + (".zst" if packed else ".raw")), 0o640)
        entries.append({"name": name, "size": len(data), "stored_size": len(stored),
                        "sha256": hashlib.sha256(data).hexdigest(), "compressed": packed})
    manifest = {"format_version": 1, "job_id": job, "epoch": 0, "uid": 0, "gid": 0, "node": "n1",
                "created": 1700000000.0, "trigger": "periodic", "files": entries, "gpu": None,
                "criu_version": "4.2.1", "extra": {}}
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.chmod(path / "manifest.json", 0o640)
    return path
