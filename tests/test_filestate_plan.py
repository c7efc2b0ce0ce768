"""Restore-side file state without CRIU: plans, the owner's rights, hostile records.

Real files, a real unprivileged owner (owner_files.py runs with its credentials); the
records are written here as a dump would have written them.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from store_fixtures import ensure_user
from slurm_mm.engine import filestate
from slurm_mm.errors import FileStateRefused, ImageCorrupt

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs the owner's side with setuid")


@pytest.fixture
def owner():
    return ensure_user("mmtest")


@pytest.fixture
def area(owner):
    base = Path(tempfile.mkdtemp(prefix="slurm_mm-plan-"))
    base.chmod(0o755)
    home = base / "home"
    home.mkdir()
    os.chown(home, owner.pw_uid, owner.pw_gid)
    images = base / "img"
    images.mkdir(mode=0o700)
    yield base, home, images
    import shutil
    shutil.rmtree(base, ignore_errors=True)


def record(path: Path, **kw) -> filestate.FileRecord:
    st = path.stat()
    fields = dict(path=str(path), dev=st.st_dev, ino=st.st_ino, size=st.st_size, mtime_ns=st.st_mtime_ns,
                  mode=st.st_mode, uid=st.st_uid, node_local=False)
    fields.update(kw)
    return filestate.FileRecord(**fields)


def write_state(images: Path, records, **kw) -> None:
    state = filestate.FileState(node=kw.pop("node", "n1"), records=records, **kw)
    (images / filestate.STATE_FILE).write_text(json.dumps(state.to_json()))


def as_owner_file(owner, path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.chown(path, owner.pw_uid, owner.pw_gid)


def prepare(images: Path, owner, node="n1", pin_root=None):
    return filestate.prepare(images, node=node, uid=owner.pw_uid, gids=[owner.pw_gid], pin_root=pin_root,
                             work=images / ".handed")


def test_unchanged_files_need_nothing(area, owner):
    _, home, images = area
    f = home / "in.dat"
    as_owner_file(owner, f, b"x" * 100)
    write_state(images, [record(f)])
    assert prepare(images, owner).report == []


def test_grown_writer_is_cut_back_and_the_reader_refusal_names_the_file(area, owner):
    _, home, images = area
    log, inp = home / "log.txt", home / "in.dat"
    as_owner_file(owner, log, b"1\n2\n")
    as_owner_file(owner, inp, b"data")
    recs = [record(log, writer=True, append_only=False), record(inp)]
    write_state(images, recs)
    with open(log, "ab") as f:
        f.write(b"3\n4\n")
    with open(inp, "ab") as f:
        f.write(b"more")
    with pytest.raises(FileStateRefused, match=r"in.dat: size 4 -> 8.*another party"):
        prepare(images, owner)
    assert log.read_bytes() == b"1\n2\n3\n4\n", "a refused plan changes nothing"
    inp.write_bytes(b"data")
    os.utime(inp, ns=(recs[1].mtime_ns, recs[1].mtime_ns))
    report = prepare(images, owner).report
    assert log.read_bytes() == b"1\n2\n" and "cut back from 8 to 4 bytes" in report[0]


def test_node_local_file_is_recreated_as_its_owner(area, owner):
    _, home, images = area
    scratch = home / "tmp" / "work.dat"
    scratch.parent.mkdir()
    os.chown(scratch.parent, owner.pw_uid, owner.pw_gid)
    as_owner_file(owner, scratch, b"abc" * 1000)
    rec = record(scratch, node_local=True, saved="mmfile-0")
    (images / "mmfile-0").write_bytes(b"abc" * 1000)
    import hashlib
    rec.sha256 = hashlib.sha256(b"abc" * 1000).hexdigest()
    write_state(images, [rec], dirs=[str(scratch.parent)])
    import shutil
    shutil.rmtree(scratch.parent)
    prepare(images, owner, node="n2")
    st = scratch.stat()
    assert scratch.read_bytes() == b"abc" * 1000 and st.st_uid == owner.pw_uid and st.st_mtime_ns == rec.mtime_ns


def test_a_record_pointing_where_the_owner_cannot_write_is_not_written_by_root(area, owner):
    base, _, images = area
    victim = base / "rootdir" / "victim"
    victim.parent.mkdir(mode=0o755)
    victim.write_bytes(b"root's data")
    rec = record(victim, node_local=True, saved="mmfile-0", uid=owner.pw_uid)
    rec.sha256 = "0" * 64
    (images / "mmfile-0").write_bytes(b"job's!")
    rec.size = 6
    write_state(images, [rec])
    prepared = prepare(images, owner, node="n2")
    assert victim.read_bytes() == b"root's data"  # untouched: the owner could not write there
    assert list(prepared.inherit.values()) == [str(victim).lstrip("/")]
    fd = next(iter(prepared.inherit))
    assert os.fstat(fd).st_uid == owner.pw_uid and os.read(fd, 10) == b"job's!"
    prepared.close()


def test_same_node_only_image_is_refused_elsewhere(area, owner):
    _, _, images = area
    write_state(images, [], same_node_only=True, notes=["/tmp/big past the budget: n3 only"], node="n3")
    with pytest.raises(FileStateRefused, match="n3 only"):
        prepare(images, owner, node="n1")
    assert prepare(images, owner, node="n3").report == []


@pytest.mark.parametrize("bad", [
    {"records": [{"path": "relative", "dev": 1, "ino": 1, "size": 0, "mtime_ns": 0, "mode": 0, "uid": 0,
                  "node_local": False}]},
    {"records": [{"path": "/x", "dev": 1, "ino": 1, "size": 0, "mtime_ns": 0, "mode": 0, "uid": 0,
                  "node_local": True, "saved": "../../etc/shadow"}]},
    {"pins": "../other-job"},
    {"records": ["not an object"]},
])
def test_damaged_state_record_is_image_corrupt(area, owner, bad):
    _, _, images = area
    (images / filestate.STATE_FILE).write_text(json.dumps({"format": 1, "node": "n1", **bad}))
    with pytest.raises(ImageCorrupt):
        prepare(images, owner)


def test_images_without_file_state_restore_as_before(area, owner):
    _, _, images = area
    assert prepare(images, owner).inherit == {}
