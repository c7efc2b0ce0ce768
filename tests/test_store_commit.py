"""Commit, extract, verification, retention, locking, epoch fencing and crash atomicity of
the image store, on real files. Crash tests run the writer in a forked child and SIGKILL it
at each phase of commit()."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import xxhash
from store_fixtures import base, commit, job_entries, source, store, tmp_entries  # noqa: F401  (fixtures)

from slurm_mm.errors import ImageCorrupt, ImageError, NoImage, StaleEpoch, StoreBusy, UsageError
from slurm_mm.store import ImageStore, Skipped, image_store

JOB = "4242"


def criu_like_files() -> dict[str, bytes]:
    return {
        "pages-1.img": os.urandom(3 << 20),                                   # incompressible
        "core-1.img": b"registers and such " * 40000,                          # compressible
        "mm-1.img": bytes(2 << 20) + os.urandom(1000),                         # mostly zero
        "inventory.img": b"\x01\x02",                                           # tiny
        "empty.img": b"",
    }


def xxh(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


# ---------------------------------------------------------------------------- round trip

def test_commit_then_extract_gives_back_every_byte(store, base):
    files = criu_like_files()
    image = commit(store, JOB, source(base, files), epoch=1, trigger="preempt", gpu={"count": 1},
                   extra={"root_pid": 77})
    assert image.seq == 1 and image.path == store.root / JOB / "ckpt-000001"
    m = image.manifest
    assert (m.job_id, m.epoch, m.trigger, m.gpu, m.extra) == (JOB, 1, "preempt", {"count": 1}, {"root_pid": 77})
    entries = {f.name: f for f in m.files}
    assert set(entries) == set(files)
    for name, data in files.items():
        assert entries[name].size == len(data)
    # One chunk each here; a raw chunk's hash is that of the file's own bytes.
    assert entries["pages-1.img"].chunks[0].hash == xxh(files["pages-1.img"])

    out = base / "restore"
    assert store.extract(image, out) == m
    assert sorted(os.listdir(out)) == sorted(files)
    for name, data in files.items():
        assert (out / name).read_bytes() == data
    assert oct(os.stat(out).st_mode & 0o777) == "0o700"


def test_incompressible_file_is_stored_raw_and_compressible_one_as_zstd(store, base):
    files = criu_like_files()
    image = commit(store, JOB, source(base, files))
    entries = {f.name: f for f in image.manifest.files}
    stored = set(os.listdir(image.path))

    noise = entries["pages-1.img"]
    assert noise.compressed is False and noise.stored_size == noise.size
    assert "pages-1.img.raw" in stored and "pages-1.img.zst" not in stored
    assert os.path.getsize(image.path / "pages-1.img.raw") == len(files["pages-1.img"])

    text = entries["core-1.img"]
    assert text.compressed is True and text.stored_size < text.size / 20
    assert "core-1.img.zst" in stored
    assert entries["empty.img"].compressed is False


def test_progress_reports_reach_the_total_on_commit_and_extract(store, base):
    files = criu_like_files()
    total = sum(map(len, files.values()))
    seen: list[tuple[int, int]] = []
    image = commit(store, JOB, source(base, files), progress=lambda done, tot: seen.append((done, tot)))
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)

    seen.clear()
    store.extract(image, base / "out", progress=lambda done, tot: seen.append((done, tot)))
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_images_are_listed_newest_first_and_latest_is_the_newest(store, base):
    src = source(base, {"a.img": b"x"})
    for epoch in range(3):
        commit(store, JOB, src, epoch=epoch)
    assert [i.seq for i in store.images(JOB)] == [3, 2, 1]
    assert store.latest(JOB).seq == 3
    assert store.latest(JOB, max_epoch=1).seq == 2
    assert store.images("999") == [] and store.latest("999") is None


def test_commit_refuses_bad_arguments_before_writing(store, base):
    src = source(base, {"a.img": b"x"})
    with pytest.raises(UsageError, match="trigger 'sometimes'"):
        commit(store, JOB, src, trigger="sometimes")
    with pytest.raises(UsageError, match="epoch -1"):
        commit(store, JOB, src, epoch=-1)
    with pytest.raises(UsageError, match="not plain JSON"):
        commit(store, JOB, src, extra={"f": object()})
    assert store.images(JOB) == []


def test_empty_source_directory_is_refused(store, base):
    with pytest.raises(ImageError, match="holds no files"):
        commit(store, JOB, source(base, {}))
    assert tmp_entries(store, JOB) == []


def test_extract_refuses_an_existing_destination(store, base):
    image = commit(store, JOB, source(base, {"a.img": b"x"}))
    (base / "out").mkdir()
    with pytest.raises(ImageError, match="already exists"):
        store.extract(image, base / "out")


# ---------------------------------------------------------------------------- damage

def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


DAMAGE = {
    "flipped byte in a raw file": (lambda p: _flip_byte(p / "pages-1.img.raw", 12345),
                                   "pages-1.img.raw chunk 0 at byte 0 has xxh3-128"),
    "flipped byte in a zstd file": (lambda p: _flip_byte(p / "core-1.img.zst", 20),
                                    "core-1.img.zst chunk 0 at byte 0 has xxh3-128"),
    "truncated file": (lambda p: os.truncate(p / "pages-1.img.raw", 100), "has 100 bytes, manifest says"),
    "missing file": (lambda p: os.unlink(p / "core-1.img.zst"), "core-1.img.zst is missing"),
    "extra file": (lambda p: (p / "evil.so").write_bytes(b"x"), "not in its manifest: 'evil.so'"),
    "missing manifest": (lambda p: os.unlink(p / "manifest.json"), "manifest.json is missing"),
    "garbage manifest": (lambda p: (p / "manifest.json").write_text("{oops"), "not valid JSON"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_image_is_skipped_for_the_previous_one(store, base, damage, caplog):
    do_damage, reason = DAMAGE[damage]
    files = criu_like_files()
    good = commit(store, JOB, source(base, files), epoch=0)
    bad = commit(store, JOB, source(base, files), epoch=1)
    do_damage(bad.path)

    skipped: list[Skipped] = []
    with caplog.at_level(logging.WARNING, logger="slurm_mm.store"):
        chosen = store.latest(JOB, skipped=skipped)
    assert chosen.seq == good.seq
    assert len(skipped) == 1 and skipped[0].path == bad.path and reason in skipped[0].reason
    assert "skipping ckpt-000002" in caplog.text and reason in caplog.text

    if damage not in ("missing manifest", "garbage manifest"):  # those are never listed at all
        with pytest.raises(ImageCorrupt, match=reason):
            store.verify(bad)
        with pytest.raises(ImageCorrupt, match=reason):
            store.extract(bad, base / "out")
        assert not (base / "out").exists()
        assert [n for n in os.listdir(base) if ".tmp-" in n] == []  # nothing half-usable left

    restored = store.extract_latest(JOB, base / "out2")
    assert restored.seq == good.seq
    assert (base / "out2" / "pages-1.img").read_bytes() == files["pages-1.img"]


def test_no_verifiable_image_means_none_and_no_image(store, base):
    image = commit(store, JOB, source(base, {"a.img": b"data"}))
    os.truncate(image.path / "a.img.raw", 1)
    assert store.latest(JOB) is None
    with pytest.raises(NoImage, match=f"job {JOB}"):
        store.extract_latest(JOB, base / "out")
    assert not (base / "out").exists()


def test_zstd_frame_that_inflates_past_the_manifest_size_is_stopped(store, base):
    # A valid frame whose output is larger than the manifest claims (a decompression bomb),
    # its hash matching: only the frame's own size gives it away, before any output.
    image = commit(store, JOB, source(base, {"a.img": bytes(1 << 20)}))
    bomb_size = os.path.getsize(image.path / "a.img.zst")
    text = (image.path / "manifest.json").read_text()
    assert '"size":1048576' in text
    (image.path / "manifest.json").write_text(text.replace('"size":1048576', '"size":1000'))
    assert store.images(JOB)[0].manifest.files[0].size == 1000
    with pytest.raises(ImageCorrupt, match="is a zstd frame of 1048576 bytes, manifest says 1000"):
        store.extract(store.images(JOB)[0], base / "out")
    assert bomb_size < 1000


# ---------------------------------------------------------------------------- retention

def test_retention_keeps_the_newest_n_images(base):
    store = ImageStore(base / "ckpt", keep=2, threads=1)
    src = source(base, {"a.img": b"x"})
    for _ in range(4):
        commit(store, JOB, src)
    assert [i.seq for i in store.images(JOB)] == [4, 3]
    assert [n for n in job_entries(store, JOB) if n.startswith("ckpt-")] == ["ckpt-000003", "ckpt-000004"]
    assert store.gc(JOB) == []


def test_damaged_images_do_not_count_toward_keep(base):
    store = ImageStore(base / "ckpt", keep=2, threads=1)
    src = source(base, {"a.img": b"x"})
    for _ in range(3):
        commit(store, JOB, src)
    (store.root / JOB / "ckpt-000003" / "manifest.json").write_text("broken")
    assert store.gc(JOB) == []  # 3 is damaged, so 2 and 1 are the two kept
    commit(store, JOB, src)     # 4 good, 3 bad, 2 good -> 1 goes
    assert [n for n in job_entries(store, JOB) if n.startswith("ckpt-")] == \
        ["ckpt-000002", "ckpt-000003", "ckpt-000004"]
    commit(store, JOB, src)     # 5, 4 kept -> 3 (damaged) and 2 go
    assert [i.seq for i in store.images(JOB)] == [5, 4]


def test_remove_job_removes_everything(store, base):
    commit(store, JOB, source(base, {"a.img": b"x"}))
    store.remove_job(JOB)
    assert not (store.root / JOB).exists()
    assert os.listdir(store.root) == []
    store.remove_job(JOB)  # already gone: nothing to do


# ---------------------------------------------------------------------------- locking

def _pause_at(phase: str, ready, release):
    def hook(name: str) -> None:
        if name == phase:
            ready.set()
            release.wait(30)
    return hook


def _writer_paused_at(root: str, src: str, phase: str, ready) -> None:
    """Child: commit, but stop forever at `phase` (holding whatever it holds there)."""
    image_store.phase_hook = _pause_at(phase, ready, threading.Event())
    commit(ImageStore(root, threads=1), JOB, Path(src))


def test_second_writer_times_out_with_store_busy_and_gc_spares_a_live_writer(store, base):
    src = source(base, {"a.img": os.urandom(1000)})
    store.prepare_job(JOB, 0, 0)
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_writer_paused_at, args=(str(store.root), str(src), "file-written", ready))
    child.start()
    try:
        assert ready.wait(20)
        assert len(tmp_entries(store, JOB)) == 1  # the live writer's partial image
        quick = ImageStore(store.root, lock_timeout=0.3)
        t0 = time.monotonic()
        with pytest.raises(StoreBusy, match=f"job {JOB}: another writer holds"):
            commit(quick, JOB, src)
        assert 0.25 < time.monotonic() - t0 < 3
        with pytest.raises(StoreBusy):
            quick.gc(JOB)
        assert len(tmp_entries(store, JOB)) == 1  # not collected while its writer lives
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    # The writer is gone: its lock went with it.
    image = commit(store, JOB, src)
    assert image.seq == 1 and tmp_entries(store, JOB) == []


# ---------------------------------------------------------------------------- epoch fencing

def test_commit_below_the_fence_is_refused_and_writes_nothing(store, base):
    src = source(base, {"a.img": b"x"})
    store.prepare_job(JOB, 0, 0)
    store.advance_epoch(JOB, 2)
    with pytest.raises(StaleEpoch, match="epoch 1 is older than the fence 2"):
        commit(store, JOB, src, epoch=1)
    assert store.images(JOB) == [] and tmp_entries(store, JOB) == []
    with pytest.raises(StaleEpoch):
        store.advance_epoch(JOB, 1)
    assert commit(store, JOB, src, epoch=2).manifest.epoch == 2
    assert commit(store, JOB, src, epoch=5).manifest.epoch == 5
    # Committing epoch 5 advanced the fence: epoch 2 is now stale too.
    with pytest.raises(StaleEpoch, match="fence 5"):
        commit(store, JOB, src, epoch=2)
    assert (store.root / JOB / "fence").read_text() == "5\n"


def test_new_run_fences_a_writer_mid_commit_without_waiting_for_it(store, base):
    src = source(base, {"a.img": os.urandom(1000)})
    store.prepare_job(JOB, 0, 0)
    store.advance_epoch(JOB, 1)
    ready, release = threading.Event(), threading.Event()
    outcome: list[BaseException | object] = []

    def stale_writer() -> None:
        try:
            outcome.append(commit(store, JOB, src, epoch=1))
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcome.append(exc)

    image_store.phase_hook = _pause_at("verified", ready, release)
    try:
        writer = threading.Thread(target=stale_writer)
        writer.start()
        assert ready.wait(20)
        t0 = time.monotonic()
        store.advance_epoch(JOB, 2)  # the requeued run starts elsewhere
        assert time.monotonic() - t0 < 1  # did not wait for the stale writer's lock
        release.set()
        writer.join(20)
    finally:
        image_store.phase_hook = None
        release.set()
    assert isinstance(outcome[0], StaleEpoch) and "fenced off by epoch 2" in str(outcome[0])
    assert store.images(JOB) == [] and tmp_entries(store, JOB) == []


def test_damaged_fence_refuses_commits(store, base):
    src = source(base, {"a.img": b"x"})
    store.prepare_job(JOB, 0, 0)
    (store.root / JOB / "fence").write_text("seven\n")
    with pytest.raises(ImageCorrupt, match="'seven' is not an epoch"):
        commit(store, JOB, src, epoch=9)
    assert store.images(JOB) == []


# ---------------------------------------------------------------------------- crash atomicity

def _writer_killed_at(root: str, src: str, phase: str) -> None:
    """Child: commit, SIGKILLed by itself when it reaches `phase` (as if the node died there)."""
    def hook(name: str) -> None:
        if name == phase:
            os.kill(os.getpid(), signal.SIGKILL)
    image_store.phase_hook = hook
    commit(ImageStore(root, keep=1, threads=1), JOB, Path(src), epoch=1)
    os._exit(0)  # reaching here means the phase was never hit: the parent sees exit code 0


BEFORE_RENAME = [p for p in image_store.PHASES if p not in ("renamed", "collected")]


@pytest.mark.parametrize("phase", BEFORE_RENAME)
def test_writer_killed_before_rename_leaves_the_previous_image_latest(base, phase):
    store = ImageStore(base / "ckpt", keep=1, threads=1)
    old_files = {"pages-1.img": os.urandom(100000), "core-1.img": b"old" * 1000}
    previous = commit(store, JOB, source(base, old_files, "old"))
    new_src = source(base, {"pages-1.img": os.urandom(100000), "core-1.img": b"new" * 1000}, "new")

    child = multiprocessing.get_context("fork").Process(
        target=_writer_killed_at, args=(str(store.root), str(new_src), phase))
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL

    assert [i.seq for i in store.images(JOB)] == [previous.seq]
    assert store.latest(JOB).seq == previous.seq
    leftovers = tmp_entries(store, JOB)
    assert len(leftovers) == (0 if phase == "locked" else 1)
    assert [p.name for p in store.gc(JOB)] == leftovers  # the dead writer's lock is free
    assert tmp_entries(store, JOB) == []
    store.extract(store.latest(JOB), base / "out")
    assert (base / "out" / "core-1.img").read_bytes() == old_files["core-1.img"]
    assert commit(store, JOB, new_src).seq == previous.seq + 1


def test_writer_killed_after_rename_has_committed(base):
    store = ImageStore(base / "ckpt", keep=1, threads=1)
    commit(store, JOB, source(base, {"a.img": b"old"}, "old"))
    new_src = source(base, {"a.img": b"new"}, "new")
    child = multiprocessing.get_context("fork").Process(
        target=_writer_killed_at, args=(str(store.root), str(new_src), "renamed"))
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    assert [i.seq for i in store.images(JOB)] == [2, 1]  # retention had not run yet
    assert store.latest(JOB).seq == 2
    assert [p.name for p in store.gc(JOB)] == ["ckpt-000001"]
    assert [i.seq for i in store.images(JOB)] == [2]


def test_every_commit_phase_is_reached_in_order(store, base):
    seen: list[str] = []
    image_store.phase_hook = seen.append
    try:
        commit(store, JOB, source(base, {"a.img": b"1", "b.img": b"2"}))
    finally:
        image_store.phase_hook = None
    assert seen == ["locked", "tmp-created", "file-written", "file-written", "manifest-written", "synced",
                    "verified", "renamed", "collected"]
