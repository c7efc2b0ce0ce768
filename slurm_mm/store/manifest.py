"""The manifest of a checkpoint image: what the image holds and how to check it.

A manifest is read back from a shared filesystem, so parsing treats it as hostile input:
strict JSON (no duplicate keys, NaN or unknown fields), exact types, bounded sizes, file
names that are single safe path components. Anything else is ImageCorrupt with one line
naming the bad value, never a traceback. This module knows nothing of directories or
processes; the store decides where a manifest lives.

Two formats are read. Version 1 (images written before chunking): flat directory, one
SHA-256 per whole file, each file zstd or raw. Version 2 (written now): files may sit in
subdirectories (`dirs`), and each file is a run of chunks, each zstd or raw, each with the
xxh3-128 hash of its stored bytes (chunks.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, NoReturn

from slurm_mm.errors import ImageCorrupt
from slurm_mm.store.chunks import HASH_HEX_LEN, HASH_NAME, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, Chunk, frame_overhead
from slurm_mm.store.safe_fs import name_problem, show

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20
MAX_FILES = 100_000
MAX_DIRS = 10_000
MAX_DEPTH = 16
MAX_PATH = 1024
# 16 TiB per file: far above any node's memory, low enough that a hostile size cannot
# make a restore fill the filesystem before its checksum fails.
MAX_FILE_SIZE = 1 << 44


class Trigger(StrEnum):
    """Why an image was taken (recorded in its manifest; metrics and logs use the value)."""

    PERIODIC = "periodic"  # the job's --checkpoint-interval
    PREEMPT = "preempt"  # Slurm selected the job for a REQUEUE/CANCEL preemption
    DRAIN = "drain"  # `slurm-mm drain` of the job's node
    MANUAL = "manual"  # `slurm-mm checkpoint` by the job's owner or root
    SUSPEND = "suspend"  # reserved: images of a suspended job's GPU state


TRIGGERS = tuple(t.value for t in Trigger)
# Triggers after which the job stops and is requeued, rather than running on.
STOPPING_TRIGGERS = frozenset({Trigger.PREEMPT, Trigger.DRAIN})

_MAX_ID = 0xFFFFFFFE  # (uid_t)-1 means "no change" to chown: never a real owner
_MAX_TEXT = 256
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class FileEntry:
    """One image file: its raw size and how it is stored and checked. Version 1: one
    sha256 for the whole file, zstd or raw (`compressed`). Version 2: `chunk_size` > 0 and
    `chunks`, each zstd or raw; `compressed` says whether any chunk is."""

    name: str
    size: int
    stored_size: int
    sha256: str
    compressed: bool
    chunk_size: int = 0
    chunks: tuple[Chunk, ...] = ()

    @property
    def chunked(self) -> bool:
        return self.chunk_size > 0

    @property
    def stored_name(self) -> str:
        """Path on disk, relative to the image directory. The suffix is always added, so
        no file can collide with another stored name or with manifest.json."""
        return self.name + (".zst" if self.compressed else ".raw")

    def chunk_spans(self) -> list[tuple[int, int, int, Chunk]]:
        """(index, raw offset, stored offset, chunk) of every chunk, in file order."""
        spans = []
        stored = 0
        for i, chunk in enumerate(self.chunks):
            spans.append((i, i * self.chunk_size, stored, chunk))
            stored += chunk.stored_size
        return spans

    def raw_length(self, index: int) -> int:
        """Raw bytes in chunk `index` (the last one may be short)."""
        return min(self.chunk_size, self.size - index * self.chunk_size)


@dataclass(frozen=True)
class Manifest:
    """Everything needed to check and restore one image. Build it through from_json() or
    the store's commit(), which validate; the constructor itself does not."""

    job_id: str
    epoch: int
    uid: int
    gid: int
    node: str
    created: float
    trigger: str
    files: tuple[FileEntry, ...]
    gpu: dict[str, Any] | None
    criu_version: str
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    dirs: tuple[str, ...] = ()
    hash: str = ""

    @property
    def total_size(self) -> int:
        """Raw bytes a restore writes."""
        return sum(f.size for f in self.files)

    @property
    def stored_size(self) -> int:
        """Bytes the image takes on the store."""
        return sum(f.stored_size for f in self.files)

    def to_json(self) -> str:
        data = asdict(self)
        if self.format_version == 1:
            del data["dirs"], data["hash"]
            data["files"] = [{k: getattr(f, k) for k in _FILE_KEYS} for f in self.files]
            return json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n"
        data["dirs"] = list(self.dirs)
        data["files"] = [{"name": f.name, "size": f.size, "stored_size": f.stored_size, "chunk_size": f.chunk_size,
                          "chunks": [[c.stored_size, "z" if c.compressed else "r", c.hash] for c in f.chunks]}
                         for f in self.files]
        # Compact: a large image has thousands of chunks, one short line each.
        text = json.dumps(data, sort_keys=True, allow_nan=False, separators=(",", ":"))
        return text.replace("[[", "[\n[").replace("],[", "],\n[") + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "manifest") -> Manifest:
        """Parse and validate; ImageCorrupt naming `source` and the bad value otherwise."""
        try:
            if isinstance(text, bytes):
                # Decode ourselves: json.loads would guess UTF-16/32 from the first bytes.
                text = text.decode("utf-8")
            data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        except RecursionError:
            raise ImageCorrupt(f"{source}: JSON nested too deeply") from None
        except UnicodeDecodeError as exc:
            raise ImageCorrupt(f"{source}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
        except ValueError as exc:  # json.JSONDecodeError and our hooks
            raise ImageCorrupt(f"{source}: not valid JSON: {exc}") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: object, *, source: str = "manifest",
                  error: type[Exception] = ImageCorrupt) -> Manifest:
        """Validate a decoded manifest. `error` lets commit() report its own bad arguments
        as a usage error with the same checks."""
        check = _Checker(source, error)
        data = check.mapping(data, "manifest")
        if not isinstance(data.get("format_version"), int) or data.get("format_version") != 2:
            check.keys(data, "manifest", _MANIFEST_KEYS)
        version = check.integer(data, "format_version", 0, 1 << 31)
        if version not in READABLE_VERSIONS:
            check.fail(f"format_version {show(version)} is not one of {', '.join(map(str, READABLE_VERSIONS))}")
        if version == 2:
            check.keys(data, "manifest", _MANIFEST_KEYS_V2)
            if data["hash"] != HASH_NAME:
                check.fail(f"hash {show(data['hash'])} is not {HASH_NAME}")
        job_id = data["job_id"]
        problem = name_problem(job_id, kind="job id")
        if problem:
            check.fail(problem)
        trigger = data["trigger"]
        if trigger not in TRIGGERS:
            check.fail(f"trigger {show(trigger)} is not one of {', '.join(TRIGGERS)}")
        created = data["created"]
        if isinstance(created, bool) or not isinstance(created, (int, float)) or not math.isfinite(created) \
                or created < 0:
            check.fail(f"created {show(created)} is not a time in seconds")
        gpu = data["gpu"]
        if gpu is not None and not isinstance(gpu, dict):
            check.fail(f"gpu {show(gpu)} is not an object or null")
        extra = data["extra"]
        if not isinstance(extra, dict):
            check.fail(f"extra {show(extra)} is not an object")
        raw_files = data["files"]
        if not isinstance(raw_files, list):
            check.fail(f"files {show(raw_files)} is not a list")
        if len(raw_files) > MAX_FILES:
            check.fail(f"files has {len(raw_files)} entries, more than {MAX_FILES}")
        if version == 1:
            files = tuple(check.file_entry(entry, i) for i, entry in enumerate(raw_files))
            dirs: tuple[str, ...] = ()
        else:
            files = tuple(check.chunked_entry(entry, i) for i, entry in enumerate(raw_files))
            dirs = check.dirs(data["dirs"])
        seen: set[str] = set()
        for f in files:
            if f.name in seen:
                check.fail(f"file {show(f.name)} is listed twice")
            seen.add(f.name)
        if version == 2:
            check.tree(dirs, files)
        return cls(
            format_version=version,
            job_id=job_id,
            epoch=check.integer(data, "epoch", 0, 1 << 31),
            uid=check.integer(data, "uid", 0, _MAX_ID),
            gid=check.integer(data, "gid", 0, _MAX_ID),
            node=check.text(data, "node"),
            created=float(created),
            trigger=trigger,
            files=files,
            gpu=gpu,
            criu_version=check.text(data, "criu_version", allow_empty=True),
            extra=extra,
            dirs=dirs,
            hash=data["hash"] if version == 2 else "",
        )


_MANIFEST_KEYS = frozenset(
    ("format_version", "job_id", "epoch", "uid", "gid", "node", "created", "trigger", "files", "gpu",
     "criu_version", "extra"))
_MANIFEST_KEYS_V2 = _MANIFEST_KEYS | {"hash", "dirs"}
_FILE_KEYS = frozenset(("name", "size", "stored_size", "sha256", "compressed"))
_CHUNKED_KEYS = frozenset(("name", "size", "stored_size", "chunk_size", "chunks"))


def path_problem(path: object, *, kind: str = "file name") -> str | None:
    """Why `path` is not an acceptable relative path below an image directory (components
    joined by '/', each one a safe name), or None if it is."""
    if not isinstance(path, str):
        return f"{kind} {show(path)} is not a string"
    if len(path) > MAX_PATH:
        return f"{kind} {show(path)} is longer than {MAX_PATH} characters"
    parts = path.split("/")
    if len(parts) > MAX_DEPTH:
        return f"{kind} {show(path)} is more than {MAX_DEPTH} directories deep"
    for part in parts:
        problem = name_problem(part, kind=kind)
        if problem:
            return problem if len(parts) == 1 else f"{kind} {show(path)}: {problem}"
    return None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {show(key)}")
        result[key] = value
    return result


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


class _Checker:
    """Field checks that raise `error` with a message prefixed by the manifest's source."""

    def __init__(self, source: str, error: type[Exception]) -> None:
        self.source = source
        self.error = error

    def fail(self, message: str) -> NoReturn:
        raise self.error(f"{self.source}: {message}")

    def mapping(self, value: object, what: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(f"{what} is {show(value)}, not an object")
        return value  # type: ignore[return-value]

    def keys(self, data: dict[str, Any], what: str, expected: frozenset[str]) -> None:
        missing = sorted(expected - data.keys())
        if missing:
            self.fail(f"{what} lacks {missing[0]!r}")
        unknown = sorted(data.keys() - expected)
        if unknown:
            self.fail(f"{what} has unknown field {show(unknown[0])}")

    def integer(self, data: dict[str, Any], key: str, low: int, high: int, what: str = "") -> int:
        value = data[key]
        label = f"{what}{key}"
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"{label} {show(value)} is not an integer")
        if not low <= value <= high:
            self.fail(f"{label} {show(value)} is out of range [{low}, {high}]")
        return value

    def text(self, data: dict[str, Any], key: str, *, allow_empty: bool = False) -> str:
        value = data[key]
        if not isinstance(value, str) or (not value and not allow_empty) or len(value) > _MAX_TEXT \
                or not value.isprintable():
            self.fail(f"{key} {show(value)} is not a printable string of at most {_MAX_TEXT} characters")
        return value

    def file_entry(self, entry: object, index: int) -> FileEntry:
        what = f"files[{index}]"
        entry = self.mapping(entry, what)
        self.keys(entry, what, _FILE_KEYS)
        problem = name_problem(entry["name"])
        if problem:
            self.fail(f"{what}: {problem}")
        sha = entry["sha256"]
        if not isinstance(sha, str) or len(sha) != 64 or not _HEX.issuperset(sha):
            self.fail(f"{what}.sha256 {show(sha)} is not 64 lowercase hex digits")
        compressed = entry["compressed"]
        if not isinstance(compressed, bool):
            self.fail(f"{what}.compressed {show(compressed)} is not true or false")
        size = self.integer(entry, "size", 0, MAX_FILE_SIZE, f"{what}.")
        stored = self.integer(entry, "stored_size", 0, MAX_FILE_SIZE, f"{what}.")
        if not compressed and stored != size:
            self.fail(f"{what}.stored_size {stored} differs from size {size} for a raw file")
        return FileEntry(name=entry["name"], size=size, stored_size=stored, sha256=sha, compressed=compressed)

    def chunked_entry(self, entry: object, index: int) -> FileEntry:
        what = f"files[{index}]"
        entry = self.mapping(entry, what)
        self.keys(entry, what, _CHUNKED_KEYS)
        problem = path_problem(entry["name"])
        if problem:
            self.fail(f"{what}: {problem}")
        size = self.integer(entry, "size", 0, MAX_FILE_SIZE, f"{what}.")
        stored = self.integer(entry, "stored_size", 0, MAX_FILE_SIZE, f"{what}.")
        chunk_size = self.integer(entry, "chunk_size", MIN_CHUNK_SIZE, MAX_CHUNK_SIZE, f"{what}.")
        raw_chunks = entry["chunks"]
        expected = -(-size // chunk_size)
        if not isinstance(raw_chunks, list) or len(raw_chunks) != expected:
            self.fail(f"{what}.chunks is not a list of {expected} chunks")
        chunks = []
        for i, item in enumerate(raw_chunks):
            raw_len = min(chunk_size, size - i * chunk_size)
            label = f"{what}.chunks[{i}]"
            if not isinstance(item, list) or len(item) != 3:
                self.fail(f"{label} {show(item)} is not [stored_size, 'z'|'r', hash]")
            length, kind, digest = item
            limit = raw_len + frame_overhead(raw_len)
            if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= limit:
                self.fail(f"{label} stored size {show(length)} is not in [0, {limit}]")
            if kind not in ("z", "r"):
                self.fail(f"{label} kind {show(kind)} is not 'z' or 'r'")
            if kind == "r" and length != raw_len:
                self.fail(f"{label} is raw but stores {length} of its {raw_len} bytes")
            if not isinstance(digest, str) or len(digest) != HASH_HEX_LEN or not _HEX.issuperset(digest):
                self.fail(f"{label} hash {show(digest)} is not {HASH_HEX_LEN} lowercase hex digits")
            chunks.append(Chunk(length, kind == "z", digest))
        if len({c.compressed for c in chunks}) > 1:
            self.fail(f"{what} mixes raw and zstd chunks")
        if sum(c.stored_size for c in chunks) != stored:
            self.fail(f"{what}.stored_size {stored} is not the sum of its chunks")
        return FileEntry(name=entry["name"], size=size, stored_size=stored, sha256="",
                         compressed=any(c.compressed for c in chunks), chunk_size=chunk_size, chunks=tuple(chunks))

    def dirs(self, value: object) -> tuple[str, ...]:
        if not isinstance(value, list) or len(value) > MAX_DIRS:
            self.fail(f"dirs {show(value)} is not a list of at most {MAX_DIRS} directories")
        seen: set[str] = set()
        for i, path in enumerate(value):
            problem = path_problem(path, kind="directory name")
            if problem:
                self.fail(f"dirs[{i}]: {problem}")
            parent = path.rpartition("/")[0]
            if parent and parent not in seen:
                self.fail(f"dirs[{i}] {show(path)} comes before its parent directory")
            if path in seen:
                self.fail(f"directory {show(path)} is listed twice")
            seen.add(path)
        return tuple(value)

    def tree(self, dirs: tuple[str, ...], files: tuple[FileEntry, ...]) -> None:
        """Every file's directory is listed, and no stored file name is also a directory."""
        known = set(dirs)
        for f in files:
            parent = f.name.rpartition("/")[0]
            if parent and parent not in known:
                self.fail(f"file {show(f.name)} is in a directory not listed in dirs")
            if f.stored_name in known or f.name in known:
                self.fail(f"file {show(f.name)} has the name of a directory")
