"""Image format 2: chunked files (zstd or raw per chunk), nested directories, damage named
down to the chunk, the commit's read-back, the priority of periodic commits, and images of
format 1 still restoring. Real files, real threads, no mocks."""

from __future__ import annotations

import io
import threading
import time
import os
import shutil
from pathlib import Path

import pytest
import xxhash
import zstandard
from store_fixtures import base, commit, source, tmp_entries, write_format1_image  # noqa: F401  (fixtures)

from slurm_mm.errors import ConfigError, ImageCorrupt, ImageError, UnsafePath
from slurm_mm.store import ImageStore, Skipped, chunks, image_store, pipeline

JOB = "5151"
CHUNK = 64 << 10  # the smallest chunk size, so small test files span many chunks


def mixed(n_chunks: int) -> bytes:
    """Alternating compressible and random chunks, each chunk distinct."""
    parts = []
    for i in range(n_chunks):
        if i % 2:
            parts.append(os.urandom(CHUNK))
        else:
            pattern = b"chunk %04d of structured data; " % i
            parts.append((pattern * (CHUNK // len(pattern) + 1))[:CHUNK])
    return b"".join(parts)


@pytest.fixture()
def store(base: Path) -> ImageStore:
    return ImageStore(base / "ckpt", keep=3, threads=2, lock_timeout=5, chunk_size=CHUNK)


def read_zstd_stream(data: bytes) -> bytes:
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
    return reader.read()


def entry(image, name):
    return next(f for f in image.manifest.files if f.name == name)


# ---------------------------------------------------------------------------- the format

def test_large_file_mixes_compressed_and_raw_chunks_and_stays_a_valid_zstd_stream(store, base):
    data = mixed(8) + b"tail"
    image = commit(store, JOB, source(base, {"pages-1.img": data}))
    e = entry(image, "pages-1.img")
    assert e.stored_name == "pages-1.img.zst" and e.chunk_size == CHUNK and len(e.chunks) == 9
    packed = [c.stored_size < CHUNK for c in e.chunks[:8]]
    assert packed == [True, False] * 4  # structured chunks packed, random ones stored as raw blocks
    assert all(c.compressed for c in e.chunks)  # every chunk of a .zst is a zstd frame
    stored = (image.path / "pages-1.img.zst").read_bytes()
    assert len(stored) == e.stored_size
    assert read_zstd_stream(stored) == data  # `zstd -d` restores it by hand
    store.extract(image, base / "out")
    assert (base / "out" / "pages-1.img").read_bytes() == data


def test_incompressible_large_file_is_stored_as_its_own_bytes(store, base):
    data = os.urandom(5 * CHUNK + 123)
    image = commit(store, JOB, source(base, {"pages-1.img": data}))
    e = entry(image, "pages-1.img")
    assert e.stored_name == "pages-1.img.raw" and not e.compressed and len(e.chunks) == 6
    assert (image.path / "pages-1.img.raw").read_bytes() == data
    assert e.chunks[0].hash == xxhash.xxh3_128_hexdigest(data[:CHUNK])
    store.extract(image, base / "out")
    assert (base / "out" / "pages-1.img").read_bytes() == data


@pytest.mark.parametrize("read_back", ["device", "cache"])
def test_both_read_back_modes_commit_and_leave_no_page_cache_requirement(base, read_back):
    store = ImageStore(base / "ckpt", threads=4, chunk_size=CHUNK, read_back=read_back)
    files = {"pages-1.img": mixed(40), "core-1.img": b"regs" * 1000, "empty.img": b""}
    seen: list[tuple[int, int]] = []
    image = commit(store, JOB, source(base, files), progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (sum(map(len, files.values())),) * 2
    store.extract(image, base / "out")
    for name, data in files.items():
        assert (base / "out" / name).read_bytes() == data


def test_device_mode_writes_and_reads_raw_chunks_past_the_page_cache(base):
    """read_back="device": whole raw chunks go to the file with O_DIRECT, the unaligned
    tail through the page cache; the image reads back equal either way."""
    store = ImageStore(base / "ckpt", threads=2, chunk_size=CHUNK, read_back="device")
    data = os.urandom(6 * CHUNK + 100)
    probe = os.open(base / "probe", os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        direct_ok = pipeline.set_direct(probe, True)
    finally:
        os.close(probe)
    written: list[int] = []
    real = pipeline._write_chunk

    def spy(opened, pieces, chunk, direct):
        real(opened, pieces, chunk, direct)
        written.append(opened.direct)

    pipeline._write_chunk = spy
    try:
        image = commit(store, JOB, source(base, {"pages-1.img": data}))
    finally:
        pipeline._write_chunk = real
    assert written == [direct_ok] * 6 + [False]  # buffered throughout where O_DIRECT is refused
    store.verify(image)
    store.extract(image, base / "out")
    assert (base / "out" / "pages-1.img").read_bytes() == data


def test_bad_store_settings_are_refused_naming_them(base):
    with pytest.raises(ConfigError, match="chunk size 1000 is not in"):
        ImageStore(base / "ckpt", chunk_size=1000)
    with pytest.raises(ConfigError, match="read_back 'disk' is not one of device, cache"):
        ImageStore(base / "ckpt", read_back="disk")
    with pytest.raises(ConfigError, match="compression level 0"):
        ImageStore(base / "ckpt", level=0)
    assert ImageStore(base / "ckpt", level=-1).level == -1  # zstd's fast levels are allowed


# ---------------------------------------------------------------------------- damage

def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def _two_images(store, base, data):
    good = commit(store, JOB, source(base, {"pages-1.img": data}), epoch=0)
    bad = commit(store, JOB, source(base, {"pages-1.img": data}), epoch=1)
    return good, bad


def test_corrupt_chunk_is_detected_and_named_and_the_previous_image_used(store, base):
    data = mixed(8)
    good, bad = _two_images(store, base, data)
    e = entry(bad, "pages-1.img")
    spans = e.chunk_spans()
    _, _, offset3, chunk3 = spans[3]
    _flip(bad.path / e.stored_name, offset3 + chunk3.stored_size // 2)
    needle = f"pages-1.img.zst chunk 3 at byte {offset3} has xxh3-128"
    with pytest.raises(ImageCorrupt, match=needle):
        store.verify(bad)
    with pytest.raises(ImageCorrupt, match=needle):
        store.extract(bad, base / "out")
    assert not (base / "out").exists() and [n for n in os.listdir(base) if ".tmp-" in n] == []
    skipped: list[Skipped] = []
    assert store.extract_latest(JOB, base / "out2", skipped=skipped).seq == good.seq
    assert needle in skipped[0].reason
    assert (base / "out2" / "pages-1.img").read_bytes() == data


def test_truncated_chunk_is_detected_by_size(store, base):
    data = os.urandom(4 * CHUNK)
    good, bad = _two_images(store, base, data)
    os.truncate(bad.path / "pages-1.img.raw", 3 * CHUNK + 100)
    with pytest.raises(ImageCorrupt, match=f"pages-1.img.raw has {3 * CHUNK + 100} bytes, manifest says {4 * CHUNK}"):
        store.verify(bad)
    assert store.latest(JOB).seq == good.seq


def test_reordered_chunks_are_detected(store, base):
    data = os.urandom(4 * CHUNK)
    good, bad = _two_images(store, base, data)
    path = bad.path / "pages-1.img.raw"
    stored = path.read_bytes()
    path.write_bytes(stored[:CHUNK] + stored[2 * CHUNK:3 * CHUNK] + stored[CHUNK:2 * CHUNK] + stored[3 * CHUNK:])
    # Chunks are checked in parallel: whichever of the two swapped ones is read first is named.
    with pytest.raises(ImageCorrupt, match=f"pages-1.img.raw chunk (1 at byte {CHUNK}|2 at byte {2 * CHUNK}) has"):
        store.extract(bad, base / "out")
    assert store.extract_latest(JOB, base / "out2").seq == good.seq


@pytest.mark.parametrize("read_back", ["cache", "device"])
def test_a_chunk_that_reads_back_wrong_fails_the_commit_and_leaves_nothing(base, read_back):
    store = ImageStore(base / "ckpt", keep=3, threads=2, lock_timeout=5, chunk_size=CHUNK, read_back=read_back)
    previous = commit(store, JOB, source(base, {"pages-1.img": os.urandom(3 * CHUNK)}, "old"))
    victims: list[int] = []

    def damage(index: int) -> None:
        if not victims:
            victims.append(index)
            tmp = store.root / JOB / tmp_entries(store, JOB)[0]
            _flip(tmp / "pages-1.img.raw", 10)

    pipeline.before_read_back = damage
    try:
        with pytest.raises(ImageCorrupt, match="chunk 0 read back as .* other bytes than were written"):
            commit(store, JOB, source(base, {"pages-1.img": os.urandom(3 * CHUNK)}, "new"))
    finally:
        pipeline.before_read_back = None
    assert [i.seq for i in store.images(JOB)] == [previous.seq] and tmp_entries(store, JOB) == []


# ---------------------------------------------------------------------------- directories

def _tree(base: Path) -> Path:
    src = source(base, {"pages-1.img": mixed(3), "inventory.img": b"inv"})
    (src / "files" / "tmp" / "job").mkdir(parents=True)
    (src / "files" / "empty").mkdir()
    (src / "files" / "tmp" / "job" / "input.dat").write_bytes(os.urandom(3 * CHUNK + 5))
    (src / "files" / "script").write_bytes(b"#!/bin/bash\necho hi\n")
    return src


def test_nested_directories_round_trip_exactly(store, base):
    src = _tree(base)
    image = commit(store, JOB, src)
    m = image.manifest
    assert m.dirs == ("files", "files/empty", "files/tmp", "files/tmp/job")
    assert {f.name for f in m.files} == {"pages-1.img", "inventory.img", "files/script",
                                         "files/tmp/job/input.dat"}
    assert (image.path / "files" / "tmp" / "job" / "input.dat.raw").is_file()
    store.verify(image)
    out = base / "out"
    store.extract(image, out)
    got = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    want = sorted(str(p.relative_to(src)) for p in src.rglob("*"))
    assert got == want
    for p in src.rglob("*"):
        if p.is_file():
            assert (out / p.relative_to(src)).read_bytes() == p.read_bytes()
    assert oct(os.stat(out / "files" / "tmp").st_mode & 0o777) == "0o700"
    assert oct(os.stat(image.path / "files" / "tmp").st_mode & 0o777) == "0o750"


@pytest.mark.parametrize("plant, needle", [
    (lambda d: os.symlink("/etc/shadow", d / "files" / "tmp" / "shadow"), "files/tmp/shadow is a symlink"),
    (lambda d: os.symlink("/etc", d / "files" / "etc"), "files/etc is a symlink"),
    (lambda d: os.mkfifo(d / "files" / "tmp" / "pipe"), "files/tmp/pipe is not a regular file"),
    (lambda d: (d / "files" / ".hidden").write_bytes(b"x"), "'.hidden'"),
])
def test_nested_symlinks_and_special_files_in_a_source_are_refused(store, base, plant, needle):
    src = _tree(base)
    plant(src)
    with pytest.raises(UnsafePath, match=needle):
        commit(store, JOB, src)
    assert store.images(JOB) == [] and tmp_entries(store, JOB) == []


def test_nested_damage_in_an_image_is_detected(store, base):
    image = commit(store, JOB, _tree(base))
    nested = image.path / "files" / "tmp" / "job"
    (nested / "planted.so").write_bytes(b"x")
    with pytest.raises(ImageCorrupt, match="has a file not in its manifest: 'files/tmp/job/planted.so'"):
        store.verify(image)
    os.unlink(nested / "planted.so")
    store.verify(image)
    real = base / "elsewhere"
    shutil.move(nested, real)
    os.symlink(real, nested)
    with pytest.raises(UnsafePath, match="files/tmp/job is a symlink"):
        store.verify(image)
    os.unlink(nested)
    shutil.move(real, nested)
    os.chmod(image.path / "files", 0o777)
    with pytest.raises(UnsafePath, match="files is group/other-writable"):
        store.verify(image)


# ---------------------------------------------------------------------------- format 1

def test_images_of_format_1_still_verify_and_restore(store, base):
    files = {"pages-1.img": os.urandom(200000), "core-1.img": b"registers " * 5000, "empty.img": b""}
    path = write_format1_image(store, JOB, files, compress=("core-1.img",))
    (image,) = store.images(JOB)
    assert image.path == path and image.manifest.format_version == 1
    store.verify(image)
    store.extract(image, base / "out")
    for name, data in files.items():
        assert (base / "out" / name).read_bytes() == data
    # A newer image is written in format 2 beside it; both are usable.
    newer = commit(store, JOB, source(base, files))
    assert newer.manifest.format_version == 2 and [i.seq for i in store.images(JOB)] == [2, 1]
    _flip(path / "pages-1.img.raw", 5)
    with pytest.raises(ImageCorrupt, match="pages-1.img.raw has sha256"):
        store.verify(image)


# ---------------------------------------------------------------------------- priority

def _policies(store, base, trigger, hurry_after_first=False):
    seen: list[int] = []

    def hook(name: str) -> None:
        if name == "file-written":  # runs in the store's writer thread
            seen.append(os.sched_getscheduler(0))
            if hurry_after_first and len(seen) == 1:
                store.hurry(JOB)

    image_store.phase_hook = hook
    try:
        commit(store, JOB, source(base, {"a.img": os.urandom(CHUNK), "b.img": os.urandom(CHUNK)}), trigger=trigger)
    finally:
        image_store.phase_hook = None
    return seen


def test_periodic_commits_run_at_idle_priority_and_others_at_normal(store, base):
    assert _policies(store, base, "periodic") == [os.SCHED_IDLE, os.SCHED_IDLE]
    assert _policies(store, base, "preempt") == [os.SCHED_OTHER, os.SCHED_OTHER]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller's thread is never lowered


def test_hurry_lifts_a_periodic_commit_in_progress(store, base):
    assert _policies(store, base, "periodic", hurry_after_first=True) == [os.SCHED_IDLE, os.SCHED_OTHER]


# ---------------------------------------------------------------------------- chunk codec

def test_chunk_decode_refuses_a_frame_of_another_size_before_inflating_it():
    raw = bytes(1 << 20)
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(raw)
    chunk = chunks.Chunk(len(frame), True, chunks.digest(frame))
    assert chunks.decode(frame, chunk, len(raw)) == raw
    with pytest.raises(chunks.Mismatch, match="is a zstd frame of 1048576 bytes, manifest says 1000"):
        chunks.decode(frame, chunk, 1000)
    with pytest.raises(chunks.Mismatch, match="has 3 bytes, manifest says"):
        chunks.decode(b"abc", chunk, len(raw))


# ---------------------------------------------------------------------------- failures

def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_source_file_that_shrinks_mid_commit_fails_it_cleanly(store, base):
    previous = commit(store, JOB, source(base, {"pages-1.img": os.urandom(CHUNK)}, "old"))
    src = source(base, {"pages-1.img": os.urandom(6 * CHUNK), "core-1.img": b"x" * 100}, "new")
    before = _fds()

    def shrink(name: str) -> None:
        if name == "tmp-created":
            os.truncate(src / "pages-1.img", 2 * CHUNK + 7)

    image_store.phase_hook = shrink
    try:
        with pytest.raises(ImageError, match="new/pages-1.img shrank while it was being stored"):
            commit(store, JOB, src)
    finally:
        image_store.phase_hook = None
    assert [i.seq for i in store.images(JOB)] == [previous.seq] and tmp_entries(store, JOB) == []
    assert _fds() == before  # every fd of the pipeline closed


def test_failed_extract_closes_everything_and_leaves_nothing(store, base):
    image = commit(store, JOB, source(base, {"pages-1.img": mixed(12), "b.img": os.urandom(3 * CHUNK)}))
    e = entry(image, "pages-1.img")
    _flip(image.path / e.stored_name, e.chunk_spans()[-1][2] + 3)
    before = _fds()
    with pytest.raises(ImageCorrupt, match="chunk 11 at byte"):
        store.extract(image, base / "out")
    assert _fds() == before and not (base / "out").exists()
    assert [n for n in os.listdir(base) if n.startswith(".out")] == []


def test_a_paced_background_commit_sleeps_off_its_cpu_and_hurry_ends_that():
    from slurm_mm.store.priority import Priority

    paced = Priority(background=True, cpu_share=0.5)
    t0 = time.monotonic()
    paced.spend(0.2)  # 0.2 CPU-s at 0.5 CPU: due 0.3 s after start (less a 0.05 s burst)
    assert 0.2 < time.monotonic() - t0 < 1.0
    waiter = threading.Thread(target=paced.spend, args=(10.0,))
    t0 = time.monotonic()
    waiter.start()
    time.sleep(0.2)
    paced.hurry()
    waiter.join(5)
    assert not waiter.is_alive() and time.monotonic() - t0 < 2
    t0 = time.monotonic()
    Priority(background=False, cpu_share=0.01).spend(5.0)  # a preemption's commit is never paced
    assert time.monotonic() - t0 < 0.1


def test_background_cpus_must_be_a_positive_number(base):
    with pytest.raises(ConfigError, match="background CPUs 0 is not a number"):
        ImageStore(base / "ckpt", background_cpus=0)
    assert ImageStore(base / "ckpt", background_cpus=0.5).background_cpus == 0.5


def test_extract_and_verify_read_files_front_to_back_in_spans_and_check_every_chunk(base, monkeypatch):
    """Spans never cross files or gaps and stay within SPAN_BYTES (one larger chunk alone);
    with spans of a few chunks, many reads in flight, a damaged chunk is still named."""
    monkeypatch.setattr(pipeline, "SPAN_BYTES", 3 * CHUNK)
    monkeypatch.setattr(pipeline, "SEQUENTIAL_READS", True)
    store = ImageStore(base / "ckpt", threads=4, chunk_size=CHUNK)
    data = mixed(20)
    image = commit(store, JOB, source(base, {"pages-1.img": data, "b.img": os.urandom(5 * CHUNK + 9)}))
    store.verify(image)
    store.extract(image, base / "out")
    assert (base / "out" / "pages-1.img").read_bytes() == data
    e = entry(image, "pages-1.img")
    _, _, offset, chunk = e.chunk_spans()[13]
    _flip(image.path / e.stored_name, offset + chunk.stored_size - 1)
    with pytest.raises(ImageCorrupt, match=f"pages-1.img.zst chunk 13 at byte {offset} has xxh3-128"):
        store.extract(image, base / "out2")
    c = chunks.Chunk(CHUNK, False, "")
    big = chunks.Chunk(4 * CHUNK, False, "")
    work = [(0, (0, 0, 0, c, CHUNK)), (0, (1, 0, CHUNK, c, CHUNK)), (0, (2, 0, 2 * CHUNK, c, CHUNK)),
            (0, (3, 0, 3 * CHUNK, c, CHUNK)), (0, (4, 0, 4 * CHUNK, big, 0)), (1, (0, 0, 0, c, CHUNK)),
            (1, (1, 0, 2 * CHUNK, c, CHUNK))]
    assert [(i, [item[0] for item in items]) for i, items in pipeline._spans(work)] == [
        (0, [0, 1, 2]), (0, [3]), (0, [4]), (1, [0]), (1, [1])]
