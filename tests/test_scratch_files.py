"""Which closed files of a scratch directory root takes into an image (no CRIU needed)."""

from __future__ import annotations

import os

import pytest

from slurm_mm.engine import scratch_files
from slurm_mm.engine.scratch_files import closed_files

OWNER = 4242
OTHER = 4343

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files owners")


def make(path, text="x", uid=OWNER):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chown(path, uid, uid)


def owned_dir(path, uid=OWNER):
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, uid)
    return path


def test_only_the_owner_s_regular_files_are_taken_and_no_link_is_followed(tmp_path):
    root = owned_dir(tmp_path / "job")
    make(root / "a.out")
    make(owned_dir(root / "stage") / "b.out")
    make(root / "theirs.out", uid=OTHER)
    secret = tmp_path / "elsewhere"
    make(secret / "key", uid=OWNER)
    os.symlink(secret / "key", root / "link-to-file")
    os.symlink(secret, root / "link-to-dir")
    os.mkfifo(root / "fifo")
    os.chown(root / "fifo", OWNER, OWNER)
    with closed_files([(str(root), str(root))], OWNER, set()) as (found, cut_short):
        paths = sorted(f.path for f in found)
        assert all(os.path.exists(f.handle) for f in found)
    assert paths == [str(root / "a.out"), str(root / "stage" / "b.out")]
    assert not cut_short


def test_a_directory_the_owner_does_not_own_is_not_walked(tmp_path):
    shared = tmp_path / "tmp"  # like /tmp itself: root's, holding every user's files
    shared.mkdir()
    make(shared / "a.out")
    with closed_files([(str(shared), str(shared))], OWNER, set()) as (found, _):
        assert found == []


def test_held_files_are_skipped_and_a_huge_directory_cuts_the_walk_short(tmp_path, monkeypatch):
    root = owned_dir(tmp_path / "job")
    for i in range(5):
        make(root / f"f{i}")
    held = os.stat(root / "f0")
    monkeypatch.setattr(scratch_files, "MAX_ENTRIES", 3)
    with closed_files([(str(root), str(root))], OWNER, {(held.st_dev, held.st_ino)}) as (found, cut_short):
        assert [f.path for f in found] == [str(root / "f1"), str(root / "f2")]
    assert cut_short


def test_a_root_path_through_a_link_is_not_walked(tmp_path):
    real = owned_dir(tmp_path / "real")
    make(real / "a.out")
    os.symlink(real, tmp_path / "via-link")
    with closed_files([(str(tmp_path / "via-link"), str(tmp_path / "via-link"))], OWNER, set()) as (found, _):
        assert found == []
    with closed_files([(str(real), str(real))], OWNER, set()) as (found, _):
        assert [f.path for f in found] == [str(real / "a.out")]
