"""One chunk of an image file: how it is stored (zstd or raw, decided per chunk) and checked.

Large image files (CRIU's pages file holds nearly all of a job's memory) are cut into
fixed-size chunks so that many threads can compress and check one file at once. Each chunk
is compressed or not as its own content earns: GPU state and random data go through
zstd for nothing, while the program's own pages pack well, and both sit in one file.

A file is stored in one of two ways, so that standard tools read it: `<name>.raw` holds
the raw bytes (every chunk raw), `<name>.zst` is a valid zstd stream of one frame per
chunk (`zstd -d` restores it by hand). In a .zst file a chunk that does not compress is
written as a frame of raw blocks: headers around its bytes, no compression work.

Every chunk is checked by the xxh3-128 hash of its stored bytes. xxh3 is not a
cryptographic hash, on purpose: the hashes catch corruption (a bad disk, a torn or
misplaced write, a truncated copy), not forgery, because whoever could rewrite an image's
data could rewrite its manifest too; images are protected by being root's. It runs at
over 20 GB/s per core, so checking costs a few percent of copying (SHA-256: about 1.8 GB/s,
BLAKE3: about 4 GB/s per core on the same machine). A compressed chunk's frame carries
zstd's own checksum of the raw bytes, which the decoder checks, and its decoded length
must be exactly the chunk's.

Knows buffers, not files or images.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import xxhash
import zstandard

HASH_NAME = "xxh3-128"
HASH_HEX_LEN = 32
DEFAULT_CHUNK_SIZE = 8 << 20
MIN_CHUNK_SIZE = 64 << 10
MAX_CHUNK_SIZE = 256 << 20
# Store a chunk compressed only if zstd saves at least this share of it.
MIN_SAVING = 0.10
_MAGIC = b"\x28\xb5\x2f\xfd"
# Frame header descriptor: 8-byte content size, single segment, no checksum, no dictionary.
_FHD_RAW = 0xE0
_BLOCK = 128 << 10
# The decision is made on a few slices spread over the chunk (about 1% of it), so that an
# incompressible chunk costs almost no zstd time.
_SLICES = 4
_SLICE = 16 << 10


class Mismatch(Exception):
    """A stored chunk is not what its manifest says (the caller names file and chunk)."""


@dataclass(frozen=True)
class Chunk:
    """A chunk as the manifest records it: bytes on disk, how they are stored, their hash."""

    stored_size: int
    compressed: bool  # a zstd frame (compressed, or raw blocks); else the raw bytes
    hash: str


Buffer = bytes | bytearray | memoryview


def digest(data: Buffer) -> str:
    """The hash recorded for a chunk's stored bytes."""
    return xxhash.xxh3_128_hexdigest(data)


def digest_pieces(pieces: list[Buffer]) -> str:
    h = xxhash.xxh3_128()
    for piece in pieces:
        h.update(piece)
    return h.hexdigest()


def raw_frame(data: memoryview) -> list[Buffer]:
    """A zstd frame holding `data` uncompressed (raw blocks), as pieces to write in order:
    no copy of `data`. Its content checksum is left out: the chunk hash covers it."""
    n = len(data)
    pieces: list[Buffer] = [_MAGIC + bytes([_FHD_RAW]) + n.to_bytes(8, "little")]
    if n == 0:
        pieces.append(b"\x01\x00\x00")
    for off in range(0, n, _BLOCK):
        size = min(_BLOCK, n - off)
        pieces.append(((size << 3) | (off + size >= n)).to_bytes(3, "little"))
        pieces.append(data[off:off + size])
    return pieces


def frame_overhead(raw_size: int) -> int:
    """Bytes a raw-block frame adds to `raw_size` bytes."""
    return 13 + 3 * max(1, -(-raw_size // _BLOCK))


class Encoder:
    """Compresses chunks for one thread (zstd contexts are not thread-safe)."""

    def __init__(self, level: int) -> None:
        self.level = level
        self._local = threading.local()

    def _cctx(self) -> zstandard.ZstdCompressor:
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = zstandard.ZstdCompressor(level=self.level, write_checksum=True, write_content_size=True)
            self._local.cctx = cctx
        return cctx

    def worth_compressing(self, data: memoryview) -> bool:
        """Whether slices spread over `data` shrink by MIN_SAVING at this level."""
        n = len(data)
        if n == 0:
            return False
        if n <= _SLICES * _SLICE:
            sample = bytes(data)
        else:
            step = (n - _SLICE) // (_SLICES - 1)
            sample = b"".join(data[i * step:i * step + _SLICE] for i in range(_SLICES))
        packed = self._cctx().compress(sample)
        return len(packed) <= len(sample) * (1 - MIN_SAVING)

    def encode(self, data: memoryview, *, zst: bool, single: bool) -> tuple[list[Buffer], Chunk]:
        """The pieces to store for `data`, in order, and their manifest record.

        zst: the file is a .zst (multi-chunk files decide this once, from a sample of the
        whole file): each chunk becomes a frame, compressed when that pays, else raw blocks.
        single: the file is this one chunk, so it may still become a .raw file.
        Raw bytes are passed on as `data` itself (no copy)."""
        if zst and self.worth_compressing(data):
            packed = self._cctx().compress(data)
            if len(packed) <= len(data) * (1 - MIN_SAVING):
                return [packed], Chunk(len(packed), True, digest(packed))
        if zst and not single:
            pieces = raw_frame(data)
            return pieces, Chunk(sum(map(len, pieces)), True, digest_pieces(pieces))
        return [data], Chunk(len(data), False, digest(data))


_dctx_local = threading.local()


def check(stored: Buffer, chunk: Chunk, raw_size: int) -> None:
    """Mismatch unless the stored bytes have the manifest's size and hash and, for a zstd
    frame, its header announces exactly `raw_size` bytes. This is all of verify's check:
    the hash was taken of the very bytes the commit wrote (and read back), so any change
    to them shows here; decoding again would only re-test zstd, at several times the cost
    of reading the disk."""
    if len(stored) != chunk.stored_size:
        raise Mismatch(f"has {len(stored)} bytes, manifest says {chunk.stored_size}")
    found = digest(stored)
    if found != chunk.hash:
        raise Mismatch(f"has {HASH_NAME} {found[:12]}..., manifest says {chunk.hash[:12]}...")
    if chunk.compressed:
        try:
            params = zstandard.get_frame_parameters(stored)
        except zstandard.ZstdError as exc:
            raise Mismatch(f"is not valid zstd ({exc})") from None
        if params.content_size != raw_size:
            raise Mismatch(f"is a zstd frame of {params.content_size} bytes, manifest says {raw_size}")


def decode(stored: Buffer, chunk: Chunk, raw_size: int) -> Buffer:
    """The raw bytes of a stored chunk, checked: Mismatch unless the stored bytes hash to
    the manifest's value and decode to exactly `raw_size` bytes."""
    check(stored, chunk, raw_size)
    if not chunk.compressed:
        return stored if isinstance(stored, (bytes, memoryview)) else memoryview(stored)
    dctx = getattr(_dctx_local, "dctx", None)
    if dctx is None:
        dctx = _dctx_local.dctx = zstandard.ZstdDecompressor()
    try:
        raw = dctx.decompress(stored, max_output_size=raw_size)
    except zstandard.ZstdError as exc:
        raise Mismatch(f"is not valid zstd ({exc})") from None
    if len(raw) != raw_size:
        raise Mismatch(f"decodes to {len(raw)} bytes, manifest says {raw_size}")
    return raw
