"""Whole-file zstd streams: reading images of format 1, and the compress-or-not sample.

Format 1 stored each file as one zstd stream or raw, with a SHA-256 of its raw bytes;
check() reads such files back (old images must still restore). worth_compressing()
decides, from slices across a file, whether a large file of format 2 is a .zst (whose
chunks then each decide for themselves). Knows file descriptors, not paths or images.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable

import zstandard

from slurm_mm.store.safe_fs import write_all

CHUNK = 4 << 20
SAMPLE = 1 << 20
# Store raw unless compression saves at least this share of the sample.
MIN_SAVING = 0.10

ByteCounter = Callable[[int], None]


class Mismatch(Exception):
    """A stored file does not decode to what its manifest says (the caller names the file)."""


class Cancelled(Exception):
    """Another file of the same image already failed; stop early."""


SLICES = 16


def worth_compressing(fd: int, level: int) -> bool:
    """Compress slices taken across the file and see whether they shrink enough.

    Not just the start: a CRIU pages file begins with the program's own (compressible)
    pages and may be random data after that (seen: 9 GB of GPU state stored at 1.1x)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return False
    step = SAMPLE // SLICES
    offsets = [0] if size <= SAMPLE else [i * (size - step) // (SLICES - 1) for i in range(SLICES)]
    sample = b"".join(os.pread(fd, step if size > SAMPLE else SAMPLE, off) for off in offsets)
    packed = zstandard.ZstdCompressor(level=level).compress(sample)
    return len(packed) <= len(sample) * (1 - MIN_SAVING)


def check(src: int, dst: int | None, *, compressed: bool, size: int, sha256: str,
          on_bytes: ByteCounter | None = None, cancelled: Callable[[], bool] | None = None) -> None:
    """Decode a stored file, writing raw bytes to dst (None: only check), and raise Mismatch
    unless it yields exactly `size` bytes with `sha256`. Stops as soon as the output runs
    past `size`, so a hostile frame cannot fill the disk."""
    digest = hashlib.sha256()
    done = 0
    raw = io.FileIO(src, "rb", closefd=False)
    try:
        if compressed:
            # The default window limit (128 MiB) bounds the decoder's memory on hostile input.
            stream = zstandard.ZstdDecompressor().stream_reader(raw, read_size=CHUNK, closefd=False)
        else:
            stream = raw
        while True:
            if cancelled and cancelled():
                raise Cancelled()
            try:
                chunk = stream.read(CHUNK)
            except OSError as exc:  # a read error of the image, not of dst
                raise Mismatch(f"cannot be read ({exc.strerror})") from None
            if not chunk:
                break
            done += len(chunk)
            if done > size:
                raise Mismatch(f"decodes to more than the {size} bytes in the manifest")
            digest.update(chunk)
            if dst is not None:
                write_all(dst, chunk)
            if on_bytes:
                on_bytes(len(chunk))
    except zstandard.ZstdError as exc:
        raise Mismatch(f"is not valid zstd ({exc})") from None
    if done != size:
        raise Mismatch(f"decodes to {done} bytes, manifest says {size}")
    if digest.hexdigest() != sha256:
        raise Mismatch(f"has sha256 {digest.hexdigest()[:16]}..., manifest says {sha256[:16]}...")
