"""The store run as root: no symlink is followed, no user-writable directory trusted, no
name escapes its directory, and a job's images are readable by its owner only."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from store_fixtures import (  # noqa: F401  (fixtures)
    OTHER, OWNER, base, commit, needs_root, other, owner, run_as, source, store, tmp_entries)

from slurm_mm.errors import ImageError, ImageRefused, UnsafePath
from slurm_mm.store import ImageStore, Skipped, acl

pytestmark = needs_root
JOB = "777"


# ---------------------------------------------------------------------------- names

@pytest.mark.parametrize("job_id", ["..", "../escape", "/etc", "a/b", ".tmp-x"])
def test_job_ids_that_leave_the_root_are_refused_everywhere(store, base, job_id):
    src = source(base, {"a.img": b"x"})
    for call in (lambda: commit(store, job_id, src), lambda: store.images(job_id),
                 lambda: store.prepare_job(job_id, 0, 0), lambda: store.gc(job_id),
                 lambda: store.remove_job(job_id), lambda: store.latest(job_id)):
        with pytest.raises(UnsafePath, match="job id"):
            call()
    assert sorted(os.listdir(base)) == ["ckpt", "src"] if (base / "ckpt").exists() else ["src"]
    assert not (base / "escape").exists()


def test_source_file_names_must_be_safe(store, base):
    src = source(base, {"a.img": b"x", ".hidden": b"y"})
    with pytest.raises(UnsafePath, match="'.hidden'"):
        commit(store, JOB, src)
    assert store.images(JOB) == [] and tmp_entries(store, JOB) == []


# ---------------------------------------------------------------------------- symlinks

def test_job_dir_that_is_a_symlink_is_refused(store, base):
    store.prepare_job("1", 0, 0)
    elsewhere = base / "elsewhere"
    elsewhere.mkdir(mode=0o750)
    os.symlink(elsewhere, store.root / JOB)
    src = source(base, {"a.img": b"x"})
    with pytest.raises(UnsafePath, match=f"{store.root / JOB} is a symlink"):
        commit(store, JOB, src)
    with pytest.raises(UnsafePath, match="is a symlink"):
        store.images(JOB)
    with pytest.raises(UnsafePath, match="is a symlink"):
        store.gc(JOB)
    assert os.listdir(elsewhere) == []  # nothing written through the link


def test_checkpoint_root_that_is_a_symlink_is_refused(base):
    real = base / "real"
    real.mkdir(mode=0o711)
    os.symlink(real, base / "ckpt")
    with pytest.raises(UnsafePath, match="is a symlink"):
        ImageStore(base / "ckpt").prepare_job(JOB, 0, 0)
    assert os.listdir(real) == []


def test_image_dir_symlink_is_skipped_not_followed(store, base):
    src = source(base, {"a.img": b"good"})
    good = commit(store, JOB, src)
    newer = commit(store, JOB, src)
    # Replace the newest image by a link to a copy elsewhere (complete and "valid").
    copy = base / "copy"
    shutil.copytree(newer.path, copy)
    shutil.rmtree(newer.path)
    os.symlink(copy, newer.path)
    skipped: list[Skipped] = []
    assert [i.seq for i in store.images(JOB, skipped=skipped)] == [good.seq]
    assert "is a symlink" in skipped[0].reason
    with pytest.raises(UnsafePath, match="is a symlink"):
        store.verify(newer)


def test_file_symlink_inside_an_image_is_refused(store, base):
    data = os.urandom(5000)
    src = source(base, {"pages-1.img": data})
    good = commit(store, JOB, src)
    bad = commit(store, JOB, src)
    # Same bytes, same size, same checksum: only the link gives it away.
    target = base / "target.raw"
    shutil.copy(bad.path / "pages-1.img.raw", target)
    os.unlink(bad.path / "pages-1.img.raw")
    os.symlink(target, bad.path / "pages-1.img.raw")
    with pytest.raises(UnsafePath, match=r"pages-1.img.raw is a symlink"):
        store.verify(bad)
    with pytest.raises(UnsafePath, match="is a symlink"):
        store.extract(bad, base / "out")
    assert not (base / "out").exists()
    skipped: list[Skipped] = []
    assert store.latest(JOB, skipped=skipped).seq == good.seq
    assert skipped[0].path == bad.path and "is a symlink" in skipped[0].reason


def test_fifo_inside_an_image_does_not_hang_the_reader(store, base):
    image = commit(store, JOB, source(base, {"a.img": b"x"}))
    os.unlink(image.path / "a.img.raw")
    os.mkfifo(image.path / "a.img.raw", 0o600)
    with pytest.raises(UnsafePath, match="not a regular file"):
        store.verify(image)


def test_symlink_in_source_dir_is_refused(store, base):
    secret = base / "secret"
    secret.write_text("root only")
    src = source(base, {"a.img": b"x"})
    os.symlink(secret, src / "pages-1.img")
    with pytest.raises(UnsafePath, match="pages-1.img is a symlink"):
        commit(store, JOB, src)
    assert store.images(JOB) == [] and tmp_entries(store, JOB) == []


def test_source_dir_writable_by_others_is_refused(store, base):
    src = source(base, {"a.img": b"x"})
    os.chmod(src, 0o777)
    with pytest.raises(UnsafePath, match=r"group/other-writable \(mode 0777\)"):
        commit(store, JOB, src)


def test_extract_into_a_user_writable_directory_is_refused(store, base):
    image = commit(store, JOB, source(base, {"a.img": b"x"}))
    shared = base / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp
    with pytest.raises(UnsafePath, match="group/other-writable"):
        store.extract(image, shared / "out")
    assert os.listdir(shared) == []


# ---------------------------------------------------------------------------- owner and mode

def test_job_dir_not_owned_by_root_is_refused(store, base, owner):
    commit(store, JOB, source(base, {"a.img": b"x"}))
    os.chown(store.root / JOB, owner.pw_uid, -1)
    with pytest.raises(UnsafePath, match=f"owned by uid {owner.pw_uid}, not root"):
        store.images(JOB)
    with pytest.raises(UnsafePath, match="not root"):
        commit(store, JOB, source(base, {"a.img": b"x"}))


@pytest.mark.parametrize("mode", [0o770, 0o757])
def test_group_or_other_writable_job_dir_is_refused(store, base, mode):
    commit(store, JOB, source(base, {"a.img": b"x"}))
    os.chmod(store.root / JOB, mode)
    with pytest.raises(UnsafePath, match=f"group/other-writable \\(mode 0{mode:o}\\)"):
        store.latest(JOB)


def test_image_dir_not_owned_by_root_is_skipped(store, base, owner):
    src = source(base, {"a.img": b"x"})
    good = commit(store, JOB, src)
    bad = commit(store, JOB, src)
    os.chown(bad.path, owner.pw_uid, -1)
    assert store.latest(JOB).seq == good.seq


def test_store_creates_root_job_and_image_modes(store, base, owner):
    image = commit(store, JOB, source(base, {"a.img": b"x"}), uid=owner.pw_uid, gid=owner.pw_gid)
    def mode(p: Path) -> str:
        st = os.lstat(p)
        return f"{st.st_uid}:{st.st_gid}:{st.st_mode & 0o7777:04o}"
    assert mode(store.root) == "0:0:0711"
    assert mode(store.root / JOB) == "0:0:0750"
    assert mode(image.path) == "0:0:0750"
    assert mode(image.path / "a.img.raw") == "0:0:0640"
    assert mode(image.path / "manifest.json") == "0:0:0640"
    for p in (store.root / JOB, image.path, image.path / "a.img.raw"):
        fd = os.open(p, os.O_RDONLY)
        try:
            assert acl.named_users(fd) == [owner.pw_uid]
        finally:
            os.close(fd)


def test_reused_job_id_of_another_user_is_refused(store, owner, other):
    store.prepare_job(JOB, owner.pw_uid, owner.pw_gid)
    assert store.prepare_job(JOB, owner.pw_uid, owner.pw_gid) == store.root / JOB  # idempotent
    with pytest.raises(ImageRefused, match=f"belongs to uid {owner.pw_uid}, not {other.pw_uid}"):
        store.prepare_job(JOB, other.pw_uid, other.pw_gid)


# ---------------------------------------------------------------------------- who can read

def _assert_only_owner_reads(image_path: Path, job_dir: Path, payload: bytes) -> None:
    manifest = image_path / "manifest.json"
    data_file = image_path / "a.img.raw"
    # The owner lists and reads their images...
    ls = run_as(OWNER, "ls", str(job_dir), str(image_path))
    assert ls.returncode == 0, ls.stderr
    assert image_path.name in ls.stdout and "a.img.raw" in ls.stdout
    cat = run_as(OWNER, "cat", str(manifest))
    assert cat.returncode == 0 and '"job_id"' in cat.stdout
    raw = subprocess.run(["runuser", "-u", OWNER, "--", "cat", str(data_file)], capture_output=True, timeout=20)
    assert raw.returncode == 0 and raw.stdout == payload
    # ...but cannot change them.
    for argv in (["touch", str(job_dir / "planted")], ["touch", str(image_path / "planted")],
                 ["sh", "-c", f"echo x >> {data_file}"], ["rm", "-f", str(manifest)],
                 ["mv", str(image_path), str(job_dir / "moved")]):
        result = run_as(OWNER, *argv)
        assert result.returncode != 0, argv
    assert data_file.read_bytes() == payload and manifest.exists()
    # Another user can do nothing.
    for argv in (["ls", str(job_dir)], ["cat", str(manifest)], ["cat", str(data_file)]):
        result = run_as(OTHER, *argv)
        assert result.returncode != 0, argv
        assert "Permission denied" in result.stderr


def test_job_owner_can_read_but_not_write_and_others_cannot_read(store, base, owner, other):
    payload = b"the owner's memory"
    image = commit(store, JOB, source(base, {"a.img": payload}), uid=owner.pw_uid, gid=owner.pw_gid)
    _assert_only_owner_reads(image.path, store.root / JOB, payload)


@pytest.fixture()
def no_acl_dir(base):
    """A ramfs mount: a real filesystem without xattrs, so setting an ACL fails EOPNOTSUPP."""
    mnt = base / "ramfs"
    mnt.mkdir(mode=0o711)
    if subprocess.run(["mount", "-t", "ramfs", "-o", "mode=0711", "ramfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a ramfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_without_acls_the_owner_reads_through_the_job_group(no_acl_dir, base, owner, other, caplog):
    store = ImageStore(no_acl_dir / "ckpt", threads=1)
    payload = b"group fallback"
    with caplog.at_level(logging.WARNING, logger="slurm_mm.store"):
        image = commit(store, JOB, source(base, {"a.img": payload}), uid=owner.pw_uid, gid=owner.pw_gid)
    assert "refuses POSIX ACLs" in caplog.text and f"group {owner.pw_gid}" in caplog.text
    st = os.stat(store.root / JOB)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, owner.pw_gid, 0o750)
    fd = os.open(image.path / "a.img.raw", os.O_RDONLY)
    try:
        assert acl.named_users(fd) is None
    finally:
        os.close(fd)
    _assert_only_owner_reads(image.path, store.root / JOB, payload)
    # and the store still works there
    assert store.latest(JOB).seq == image.seq
    with pytest.raises(ImageRefused, match=f"belongs to group {owner.pw_gid}"):
        store.prepare_job(JOB, other.pw_uid, other.pw_gid)


def test_owner_can_list_and_verify_their_images_through_the_store(store, base, owner, other):
    """The `slurm-mm images` path as the job's user: root-owned dirs are trusted, the ACL lets
    them read; nothing requires write access."""
    payload = os.urandom(3000)
    image = commit(store, JOB, source(base, {"a.img": payload}), uid=owner.pw_uid, gid=owner.pw_gid)
    repo = Path(__file__).resolve().parents[1]
    python = Path(os.environ.get("SLURM_MM_PYTHON", "/opt/slurm_mm/venv/bin/python"))
    if not python.exists():
        python = Path(shutil.which("python3"))
    if run_as(OWNER, str(python), "-c", "import sys; sys.path.insert(0, sys.argv[1]); import slurm_mm.store",
              str(repo)).returncode != 0:
        pytest.skip(f"{OWNER} cannot import slurm_mm from {repo}")
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from slurm_mm.store import ImageStore\n"
            "try:\n"
            "    i = ImageStore(sys.argv[1]).latest('" + JOB + "'); print(i.seq, i.manifest.uid)\n"
            "except Exception as e:\n"
            "    print(type(e).__name__, e)")
    result = run_as(OWNER, str(python), "-c", code, str(store.root), str(repo))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(image.seq), str(owner.pw_uid)]
    refused = run_as(OTHER, str(python), "-c", code, str(store.root), str(repo))
    assert refused.stdout.strip() == f"PermissionDenied {store.root / JOB}: permission denied"


def test_failed_commit_leaves_no_partial_image(store, base):
    image = commit(store, JOB, source(base, {"a.img": b"x"}))
    src = source(base, {"a.img": b"x", "sub": b""})
    os.unlink(src / "sub")
    os.mkfifo(src / "sub")
    with pytest.raises(UnsafePath, match="sub is not a regular file"):
        commit(store, JOB, src)
    assert [i.seq for i in store.images(JOB)] == [image.seq] and tmp_entries(store, JOB) == []


def test_missing_root_parent_is_a_one_line_error(base):
    store = ImageStore(base / "nope" / "ckpt")
    with pytest.raises(ImageError, match="No such file or directory"):
        store.prepare_job(JOB, 0, 0)
