"""The file state a job's image depends on: recorded at dump, put back before restore.

CRIU records only the paths (and sizes) of the files a tree holds open; it cannot bring
back a node-local file on another node, nor a shared file that was deleted, grown or
rewritten after the image. This module makes the image a snapshot of the tree *and* of
those files (docs/design.md, "File state"):

- capture() runs while CRIU has the tree frozen (its post-dump action, so the files are
  seen at the same instant as the memory). For every regular file the tree holds open or
  maps, it records path, inode, size, mtime, mode, how it was opened; it copies node-local
  files (`node_local` prefixes: /tmp, the Slurm spool dir, ...) into the image (mmfile-N),
  within a byte budget; it pins shared files with a hard link (same filesystem as the
  store, no bytes copied) and copies files opened read-write (rewritten in place) within
  the same budget, then, with what is left of it, the owner's shared files it could not
  pin (another filesystem). Past the budget the image is marked same-node-only.
- plan() and prepare() run before CRIU restores the image: every recorded file is
  checked, as the job's owner, against its record; grown files the job wrote are cut
  back, deleted or replaced files are brought back from their pin or copy, node-local
  files are recreated at their path; anything that cannot be made to match is a
  FileStateRefused naming the file and the difference, before anything is changed.

Root-run. Capture reads files through /proc/PID/fd and /proc/PID/map_files (the inode
the job holds, never a path it could swap); it only saves content the owner could read.
Everything done at a path a user controls is done by owner_files.py running with the
owner's credentials; root only opens its own copies and pins.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

if __name__ == "__main__":  # run by CRIU as a script: use the package this file is part of
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from slurm_mm.engine.outside_files import outside_files  # noqa: E402
from slurm_mm.engine.scratch_files import MAX_ENTRIES, ClosedFile, closed_files  # noqa: E402
from slurm_mm.errors import FileStateRefused, ImageCorrupt  # noqa: E402

STATE_FILE = "filestate.json"
SAVED_PREFIX = "mmfile-"  # saved copies lie flat beside CRIU's files (the store keeps flat images)
FORMAT = 1
OWNER_FILES = Path(__file__).with_name("owner_files.py")

# Never part of a job's file state: the system the job runs on (CRIU checks executables
# and libraries itself), kernel filesystems and device nodes.
SYSTEM_PREFIXES = ("/usr/", "/lib/", "/lib32/", "/lib64/", "/bin/", "/sbin/", "/etc/", "/opt/",
                   "/proc/", "/sys/", "/dev/", "/run/", "/boot/", "/var/lib/", "/var/cache/")
ALWAYS_TRACKED = ("/dev/shm/",)
DELETED = " (deleted)"
MAPPED_WRITABLE = -1  # note()'s flags for a shared writable mapping (no fd, no offset)
EXTERNAL_KEY = re.compile(r"file\[[0-9a-f]+:[0-9a-f]+\]")  # criu.external_file_key's form
HASH_LIMIT = 64 << 20  # node-local files not saved are still hashed up to this size


@dataclass
class FileRecord:
    """One inode the tree held, as it was at the image."""

    path: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    mode: int  # st_mode
    uid: int
    node_local: bool
    writer: bool = False  # some fd had it open for writing
    append_only: bool = True  # every writing fd had O_APPEND
    read_write: bool = False  # some fd had O_RDWR without O_APPEND (rewrites in place)
    mapped: bool = False
    deleted: bool = False  # unlinked at image time: CRIU saves it (ghost file)
    flags: int = 0  # open flags of the first fd (for a handed-over copy)
    pos: int = 0  # its offset
    saved: str | None = None  # mmfile-N: a copy of its content in the image
    sha256: str | None = None  # of the saved copy
    pin: str | None = None  # name of the hard link under the pin directory
    held: bool = True  # False: a closed file of the job's node-local scratch (scratch_files.py)
    external: str | None = None  # CRIU's key when the file lives outside the tree's mount namespace

    @classmethod
    def from_json(cls, d: Any) -> FileRecord:
        if not isinstance(d, dict):
            raise ImageCorrupt(f"{STATE_FILE}: record {str(d)[:80]!r} is not an object")
        names = {f for f in cls.__dataclass_fields__}
        try:
            rec = cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as exc:
            raise ImageCorrupt(f"{STATE_FILE}: bad record: {exc}") from None
        if not isinstance(rec.path, str) or not rec.path.startswith("/") or "\0" in rec.path:
            raise ImageCorrupt(f"{STATE_FILE}: bad path {str(rec.path)[:80]!r}")
        if rec.saved is not None and (not isinstance(rec.saved, str) or not rec.saved.startswith(SAVED_PREFIX)
                                      or not rec.saved[len(SAVED_PREFIX):].isdigit()):
            raise ImageCorrupt(f"{STATE_FILE}: bad saved copy name {str(rec.saved)[:80]!r}")
        if rec.pin is not None and (not isinstance(rec.pin, str) or not rec.pin.isdigit()):
            raise ImageCorrupt(f"{STATE_FILE}: bad pin name {str(rec.pin)[:80]!r}")
        if rec.external is not None and not (isinstance(rec.external, str) and EXTERNAL_KEY.fullmatch(rec.external)):
            raise ImageCorrupt(f"{STATE_FILE}: bad external key {str(rec.external)[:80]!r}")
        return rec


@dataclass
class FileState:
    """What an image records of its files."""

    node: str
    records: list[FileRecord] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)  # node-local directories the tree needs (cwd, parents)
    dir_modes: dict[str, int] = field(default_factory=dict)  # their permission bits (CRIU checks a cwd's)
    pins: str | None = None  # the pin directory's name (under the job's pin root)
    saved_bytes: int = 0
    same_node_only: bool = False
    notes: list[str] = field(default_factory=list)
    sockets: list[str] = field(default_factory=list)  # paths of unix sockets the tree has bound

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def read(cls, images_dir: Path) -> FileState | None:
        """The image's record; None for images made before file state was recorded."""
        path = images_dir / STATE_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ImageCorrupt(f"{path} is unreadable: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ImageCorrupt(f"{path}: unknown format {str(data)[:60]!r}")
        dirs = data.get("dirs", [])
        if not isinstance(dirs, list) or not all(isinstance(d, str) and d.startswith("/") for d in dirs):
            raise ImageCorrupt(f"{path}: bad dirs")
        modes = data.get("dir_modes", {})
        if not isinstance(modes, dict) or not all(isinstance(m, int) and 0 <= m <= 0o7777 for m in modes.values()):
            raise ImageCorrupt(f"{path}: bad dir_modes")
        pins = data.get("pins")
        if pins is not None and (not isinstance(pins, str) or "/" in pins or pins.startswith(".")):
            raise ImageCorrupt(f"{path}: bad pins name {str(pins)[:60]!r}")
        sockets = data.get("sockets", [])
        if not isinstance(sockets, list) or not all(isinstance(p, str) and p.startswith("/") for p in sockets):
            raise ImageCorrupt(f"{path}: bad sockets")
        return cls(node=str(data.get("node", "")), sockets=sockets,
                   records=[FileRecord.from_json(r) for r in data.get("records", [])],
                   dirs=dirs, dir_modes={str(k): v for k, v in modes.items()}, pins=pins, saved_bytes=int(data.get("saved_bytes", 0)),
                   same_node_only=bool(data.get("same_node_only")),
                   notes=[str(n) for n in data.get("notes", [])])


# --------------------------------------------------------------------- capture

@dataclass(frozen=True)
class CaptureSpec:
    """What the post-dump action needs; written by the engine, read by the hook."""

    init_pid: int
    images_dir: str
    node: str
    owner_uid: int
    owner_gids: list[int]
    node_local: list[str]  # absolute directory prefixes
    budget: int  # bytes of copies an image may carry
    pin_root: str | None  # the job's pin root (same filesystem as the store), or None
    pin_name: str | None
    scratch: list[str] = field(default_factory=list)  # node-local dirs whose closed files count ($TMPDIR)


def _under(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == p.rstrip("/") or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def tracked(path: str) -> bool:
    """Whether a file at `path` is part of a job's file state (not the system's)."""
    return _under(path, ALWAYS_TRACKED) or not path.startswith(SYSTEM_PREFIXES)


def owner_can_read(st: os.stat_result, uid: int, gids: Sequence[int]) -> bool:
    """Mode bits as the owner's read permission (no ACLs: a copy is never wider)."""
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IRUSR)
    if st.st_gid in gids:
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)


def _fdinfo(pid: int, fd: int) -> tuple[int, int]:
    pos, flags = 0, 0
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("pos:"):
                    pos = int(line.split()[1])
                elif line.startswith("flags:"):
                    flags = int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return pos, flags


def _open_files(pid: int) -> Iterable[tuple[str, str, int, int]]:
    """(path as the kernel names it, /proc handle, flags, pos) of each regular-file fd."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return
    for fd in fds:
        handle = f"/proc/{pid}/fd/{fd}"
        try:
            target = os.readlink(handle)
        except OSError:
            continue
        if target.startswith("/"):
            pos, flags = _fdinfo(pid, int(fd))
            yield target, handle, flags, pos


def bound_sockets(pid: int) -> list[str]:
    """Paths of the unix sockets task `pid` holds bound (CRIU binds them again, as root, on
    restore), relative ones made absolute against the task's cwd."""
    from slurm_mm.engine.owner_check import unix_paths  # noqa: PLC0415

    bound = None
    found = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if stat.S_ISSOCK(st.st_mode):
            bound = unix_paths(pid) if bound is None else bound
            path = bound.get(st.st_ino)
            if path and not path.startswith("/"):
                try:
                    path = os.path.join(os.readlink(f"/proc/{pid}/cwd"), path)
                except OSError:
                    continue
            if path:
                found.append(os.path.normpath(path))
    return found


def _mapped_files(pid: int) -> Iterable[tuple[str, str, bool]]:
    """(path, /proc/PID/map_files handle, shared-writable) of each file-backed mapping."""
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.readlines()
    except OSError:
        return
    seen = set()
    for line in lines:
        parts = line.rstrip("\n").split(maxsplit=5)
        if len(parts) < 6 or not parts[5].startswith("/") or parts[4] == "0":
            continue
        writes = "w" in parts[1] and "s" in parts[1]  # MAP_SHARED + PROT_WRITE: rewrites the file
        if (parts[5], writes) in seen:
            continue
        seen.add((parts[5], writes))
        yield parts[5], f"/proc/{pid}/map_files/{parts[0]}", writes


def _strip_deleted(path: str) -> tuple[str, bool]:
    return (path[: -len(DELETED)], True) if path.endswith(DELETED) else (path, False)


def capture(spec: CaptureSpec, pids: Sequence[int]) -> FileState:
    """Record (and copy or pin) the files of the frozen tree `pids`; writes STATE_FILE."""
    images = Path(spec.images_dir)
    state = FileState(node=spec.node, pins=spec.pin_name)
    by_inode: dict[tuple[int, int], FileRecord] = {}
    handles: dict[tuple[int, int], str] = {}
    dirs: dict[str, int] = {}  # node-local directory -> its permission bits

    def note(kernel_path: str, handle: str, flags: int | None, pos: int) -> None:
        path, deleted = _strip_deleted(kernel_path)
        if not tracked(path):
            return
        try:
            st = os.stat(handle)
        except OSError:
            return
        if not stat.S_ISREG(st.st_mode):
            return
        key = (st.st_dev, st.st_ino)
        rec = by_inode.get(key)
        if rec is None:
            rec = FileRecord(path=path, dev=st.st_dev, ino=st.st_ino, size=st.st_size,
                             mtime_ns=st.st_mtime_ns, mode=st.st_mode, uid=st.st_uid,
                             node_local=_under(path, spec.node_local), deleted=deleted,
                             flags=flags if flags and flags > 0 else os.O_RDONLY, pos=pos)
            by_inode[key] = rec
            handles[key] = handle
        if flags is None:
            rec.mapped = True
            return
        if flags == MAPPED_WRITABLE:
            rec.mapped = rec.writer = rec.read_write = True
            rec.append_only = False
            return
        if flags & os.O_ACCMODE != os.O_RDONLY:
            rec.writer = True
            if not flags & os.O_APPEND:
                rec.append_only = False
                if flags & os.O_ACCMODE == os.O_RDWR:
                    rec.read_write = True

    sockets: set[str] = set()
    roots = [(d, d) for d in spec.scratch if _under(d, spec.node_local)]
    for pid in pids:
        for path, handle, flags, pos in _open_files(pid):
            note(path, handle, flags, pos)
        sockets.update(bound_sockets(pid))
        for path, handle, writes in _mapped_files(pid):
            note(path, handle, MAPPED_WRITABLE if writes else None, 0)
        try:
            cwd, gone = _strip_deleted(os.readlink(f"/proc/{pid}/cwd"))
            if not gone and _under(cwd, spec.node_local):
                dirs[cwd] = _dir_mode(f"/proc/{pid}/cwd")
                roots.append((cwd, f"/proc/{pid}/cwd"))
        except OSError:
            pass

    _mark_external(spec.init_pid, pids, by_inode)
    stdio = _stdio_inodes(spec.init_pid)
    for key in stdio:
        by_inode.pop(key, None)  # the job's stdio: the restorer hands the new run's in its place
    with closed_files(roots, spec.owner_uid, set(by_inode) | stdio) as (closed, cut_short):
        for found in closed:
            key = (found.st.st_dev, found.st.st_ino)
            by_inode[key] = _closed_record(found)
            handles[key] = found.handle
        if cut_short:
            state.same_node_only = True
            state.notes.append(f"the job's node-local scratch directories hold more than {MAX_ENTRIES} "
                               f"entries: the image can resume the job on {spec.node} only")
        _save_and_pin(spec, state, by_inode, handles, dirs, images)
    state.records = [by_inode[k] for k in sorted(by_inode, key=lambda k: by_inode[k].path)]
    state.dirs = sorted(dirs)
    state.dir_modes = dict(sorted(dirs.items()))
    state.sockets = sorted(sockets)
    if state.pins is not None and not any(r.pin for r in state.records):
        os.rmdir(os.path.join(str(spec.pin_root), state.pins))
        state.pins = None
    _write_json(images / STATE_FILE, state.to_json())
    return state


def _mark_external(init_pid: int, pids: Sequence[int], by_inode: dict[tuple[int, int], FileRecord]) -> None:
    """Files the tree holds from outside its mount namespace (a file handed over at an
    earlier restore, unlinked, on the host's mount): CRIU dumps them as external, so the
    image must carry their content and the restore hands a new copy in by the same key."""
    for (pid, fd), (key, _path) in outside_files(init_pid, pids).items():
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        rec = by_inode.get((st.st_dev, st.st_ino))
        if rec is not None and stat.S_ISREG(st.st_mode):
            rec.external = key


def _dir_mode(path: str) -> int:
    """Permission bits of a directory (set-id and sticky bits never recreated); 0o700 if gone."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode) & 0o777
    except OSError:
        return 0o700


def _closed_record(found: ClosedFile) -> FileRecord:
    st = found.st
    return FileRecord(path=found.path, dev=st.st_dev, ino=st.st_ino, size=st.st_size,
                      mtime_ns=st.st_mtime_ns, mode=st.st_mode, uid=st.st_uid, node_local=True,
                      writer=True, append_only=False, held=False)


def _save_and_pin(spec: CaptureSpec, state: FileState, by_inode: dict[tuple[int, int], FileRecord],
                  handles: dict[tuple[int, int], str], dirs: dict[str, int], images: Path) -> None:
    """Copy what the image must carry (node-local and rewritten-in-place files, the held
    ones first, smallest first, within the budget) and pin shared files."""
    pin_dir = _make_pin_dir(spec)
    budget = spec.budget
    unpinned: list[tuple[int, int]] = []
    numbered = {key: n for n, key in enumerate(sorted(by_inode, key=lambda k: by_inode[k].path))}
    # Held files first, then smallest first: a budget that cannot hold everything keeps as many as it can.
    for key in sorted(by_inode, key=lambda k: (not by_inode[k].held, by_inode[k].size, by_inode[k].path)):
        rec, n = by_inode[key], numbered[key]
        if rec.node_local:
            parent = os.path.dirname(rec.path)
            dirs.setdefault(parent, _dir_mode(parent))
        if rec.deleted and not rec.external:
            continue  # CRIU keeps its content (ghost file); only its directory must exist
        readable = owner_can_read(os.stat(handles[key]), spec.owner_uid, spec.owner_gids)
        if (rec.node_local or rec.read_write or rec.external) and readable and rec.size <= budget:
            rec.saved, rec.sha256 = _copy(handles[key], images, n, rec.size)
            budget -= rec.size
            state.saved_bytes += rec.size
        elif rec.node_local:
            why = (f"({rec.size} bytes) is past the image's file budget of {spec.budget} bytes" if readable
                   else "could not be saved (its owner cannot read it)")
            state.same_node_only = True
            state.notes.append(f"{rec.path} {why}: the image can resume the job on {spec.node} only")
            if rec.size <= HASH_LIMIT:  # on its own node a rewritten copy (the batch script) still matches
                rec.sha256 = _digest(handles[key], rec.size)
        if not rec.node_local and pin_dir is not None and rec.dev == os.stat(pin_dir).st_dev:
            try:
                pin_inode(handles[key], rec, os.path.join(pin_dir, str(n)))
                rec.pin = str(n)
            except OSError:
                pass  # e.g. a filesystem without hard links: a copy below, or change detection
        if not rec.node_local and rec.pin is None and rec.saved is None and rec.uid == spec.owner_uid and readable:
            unpinned.append(key)
    # The owner's shared files that could not be pinned (another filesystem than the
    # store's, as a home on NFS beside a store on Lustre) are copied with what the budget
    # has left: an intermediate the job deletes after the image must still come back.
    for key in unpinned:
        rec = by_inode[key]
        if rec.size <= budget:
            rec.saved, rec.sha256 = _copy(handles[key], images, numbered[key], rec.size)
            budget -= rec.size
            state.saved_bytes += rec.size
    if pin_dir is None:
        state.pins = None


def _stdio_inodes(init_pid: int) -> set[tuple[int, int]]:
    from slurm_mm.engine.proctree import children  # noqa: PLC0415

    found = set()
    for kid in children(init_pid):
        for fd in (0, 1, 2):
            try:
                st = os.stat(f"/proc/{kid}/fd/{fd}")
            except OSError:
                continue
            found.add((st.st_dev, st.st_ino))
    return found


_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400


def link_inode(proc_handle: str, dest: str) -> None:
    """A new name for the inode behind a /proc fd or map_files link (os.link cannot: it
    calls link(2), which links the /proc symlink itself)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.linkat(_AT_FDCWD, os.fsencode(proc_handle), _AT_FDCWD, os.fsencode(dest), _AT_SYMLINK_FOLLOW) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dest)


_AT_EMPTY_PATH = 0x1000


def pin_inode(proc_handle: str, rec: FileRecord, dest: str) -> None:
    """Hard-link the job's inode to `dest`. A tree in its own mount namespace holds the file
    through a mount of its own (linkat across mounts is EXDEV): then the same inode is
    found at its path in ours, checked by dev/inode on an O_PATH fd, and linked from it."""
    try:
        link_inode(proc_handle, dest)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    fd = os.open(rec.path, os.O_PATH | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (rec.dev, rec.ino):
            raise OSError(errno.ESTALE, "not the job's file any more", rec.path)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.linkat(fd, b"", _AT_FDCWD, os.fsencode(dest), _AT_EMPTY_PATH) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), dest)
    finally:
        os.close(fd)


def _make_pin_dir(spec: CaptureSpec) -> str | None:
    if not spec.pin_root or not spec.pin_name:
        return None
    try:
        os.makedirs(spec.pin_root, mode=0o700, exist_ok=True)
        st = os.lstat(spec.pin_root)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
            return None  # not ours: pin nothing rather than write where we should not
        path = os.path.join(spec.pin_root, spec.pin_name)
        os.mkdir(path, 0o700)
        return path
    except OSError:
        return None


def _copy(handle: str, images: Path, n: int, size: int) -> tuple[str, str]:
    """Copy the inode behind `handle` into mmfile-N of the image; (name, sha256)."""
    name = f"{SAVED_PREFIX}{n}"
    with open(images / name, "xb") as dst:
        return name, _digest(handle, size, dst.write)


def _digest(handle: str, size: int, sink=None) -> str:
    """sha256 of the first `size` bytes (the size at the image: a writer past it is not
    part of the image), each chunk also handed to `sink`."""
    digest = hashlib.sha256()
    with open(handle, "rb") as src:
        left = size
        while left > 0:
            chunk = src.read(min(left, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            if sink is not None:
                sink(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def post_dump_script(work: Path, spec: CaptureSpec) -> str:
    """A CRIU --action-script that runs capture() at post-dump (the tree still frozen).

    A failed capture fails the dump: CRIU then lets the tree run on (no image without
    its file state)."""
    spec_path = work / "filestate-spec.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    script = work / "post-dump.sh"
    cmd = [sys.executable, "-I", str(Path(__file__).resolve()), "capture", str(spec_path)]
    script.write_text(
        "#!/bin/sh\n"
        '[ "$CRTOOLS_SCRIPT_ACTION" = post-dump ] || exit 0\n'
        f"exec {shlex.join(cmd)}\n"
    )
    script.chmod(0o700)
    return str(script)


def prune_pins(pin_root: Path, keep: set[str | None]) -> None:
    """Remove the pin directories no image refers to any more (after retention)."""
    try:
        names = os.listdir(pin_root)
    except OSError:
        return
    for name in names:
        if name in keep:
            continue
        path = pin_root / name
        try:
            for entry in os.listdir(path):
                os.unlink(path / entry)
            os.rmdir(path)
        except OSError:
            pass


# --------------------------------------------------------------------- restore

@dataclass
class Action:
    """One change, made as the owner, that brings a path back to its record."""

    op: str  # write (from a copy), link (a pin back in place), truncate, mkdir
    path: str
    source: str | None = None  # for write/link: the root-side file it comes from
    size: int = 0
    mode: int = 0
    mtime_ns: int = 0
    why: str = ""


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # each names a file and its difference
    handed: list[FileRecord] = field(default_factory=list)  # node-local files only a copy can stand for


def _probe(paths: Sequence[str], uid: int, gids: Sequence[int], hash_paths: Sequence[str] = ()) -> dict[str, Any]:
    """What the owner sees at each path (stat, and sha256 where asked)."""
    return _as_owner({"op": "probe", "paths": list(paths), "hash": list(hash_paths)}, uid, gids, ())


@functools.lru_cache(maxsize=1)
def _owner_files_source() -> str:
    """owner_files.py's text, read by root and handed over in argv: the owner needs no
    right to slurm_mm's own files (an install or checkout only root can read)."""
    return OWNER_FILES.read_text()


def _as_owner(request: dict[str, Any], uid: int, gids: Sequence[int], fds: Sequence[int]) -> dict[str, Any]:
    """Run owner_files.py with the owner's credentials and a fixed environment."""
    gids = list(gids) or [uid]
    try:
        res = subprocess.run(
            [sys.executable, "-I", "-c", _owner_files_source()], input=json.dumps(request), capture_output=True,
            text=True, timeout=600, env={"PATH": "/usr/bin:/bin", "LANG": "C"}, cwd="/",
            user=uid, group=gids[0], extra_groups=gids, pass_fds=tuple(fds))
    except (OSError, subprocess.SubprocessError) as exc:
        raise FileStateRefused(f"cannot check the job's files as its owner: {exc}") from None
    try:
        answer = json.loads(res.stdout)
    except ValueError:
        raise FileStateRefused(
            f"checking the job's files as its owner failed: {(res.stderr or res.stdout).strip()[-300:]}") from None
    if not isinstance(answer, dict):
        raise FileStateRefused("checking the job's files as its owner gave no answer")
    return answer


def _describe(rec: FileRecord, now: dict[str, Any]) -> str:
    parts = []
    if now.get("size") != rec.size:
        parts.append(f"size {rec.size} -> {now.get('size')}")
    if now.get("mtime_ns") != rec.mtime_ns:
        parts.append("modified since the image")
    return ", ".join(parts) or "changed"


def plan(state: FileState, images_dir: Path, *, node: str, uid: int, gids: Sequence[int],
         pin_root: Path | None) -> Plan:
    """Decide, without changing anything, how every recorded file gets back to its record."""
    out = Plan()
    if state.same_node_only and state.node != node:
        out.problems.extend(state.notes or [f"the image holds node-local files of {state.node} only"])
        return out
    _plan_sockets(state.sockets, uid, gids, out)
    live = [r for r in state.records if not r.deleted]
    # A file written through a shared mapping may keep its size and mtime (tmpfs updates no
    # mtime for such writes): where the image holds a copy of a mapped file, content decides.
    hashes = [r.path for r in live if r.sha256 and (r.node_local or (r.mapped and r.saved))]
    seen = _probe([r.path for r in live], uid, gids, hashes)
    for d in state.dirs + sorted({os.path.dirname(r.path) for r in state.records
                                  if (r.deleted or r.node_local) and not r.external}):
        if not any(a.op == "mkdir" and a.path == d for a in out.actions):
            out.actions.append(Action("mkdir", d, mode=state.dir_modes.get(d, 0o700), why="directory the job had"))
    for rec in live:
        now = seen.get(rec.path) or {}
        if rec.node_local:
            _plan_local(rec, now, images_dir, out)
        else:
            _plan_shared(rec, now, images_dir, state, pin_root, out)
    return out


def _plan_sockets(sockets: Sequence[str], uid: int, gids: Sequence[int], out: Plan) -> None:
    """Root CRIU will unlink and bind each socket path again: refuse, before it runs, any
    whose directory the owner could not create a socket in now (a directory the user has
    since swapped for a link into /run or /etc). The owner check after CRIU looks again."""
    if not sockets:
        return
    seen = _as_owner({"op": "sockdirs", "paths": list(sockets)}, uid, gids, ())
    for path in sockets:
        now = seen.get(path) or {}
        if not now.get("ok"):
            out.problems.append(f"unix socket {path}: its owner may not bind it there now "
                                f"({now.get('error', 'not checked')})")


def _plan_local(rec: FileRecord, now: dict[str, Any], images_dir: Path, out: Plan) -> None:
    if (now.get("dev"), now.get("ino"), now.get("size"), now.get("mtime_ns")) == (
            rec.dev, rec.ino, rec.size, rec.mtime_ns):
        return  # untouched since the image (restored on its own node)
    if now.get("size") == rec.size and now.get("sha256") == rec.sha256 and rec.sha256:
        return  # same content
    if rec.saved is None:
        out.problems.append(f"{rec.path}: node-local file not saved in the image, and not here as it was")
        return
    out.actions.append(Action("write", rec.path, str(images_dir / rec.saved), rec.size, rec.mode,
                              rec.mtime_ns, "node-local file recreated"))


def _plan_shared(rec: FileRecord, now: dict[str, Any], images_dir: Path, state: FileState,
                 pin_root: Path | None, out: Plan) -> None:
    same_inode = now.get("dev") == rec.dev and now.get("ino") == rec.ino
    if same_inode and now.get("size") == rec.size and now.get("mtime_ns") == rec.mtime_ns and (
            not now.get("sha256") or now.get("sha256") == rec.sha256):
        return
    copy = str(images_dir / rec.saved) if rec.saved else None
    if same_inode:
        grown = rec.writer and int(now.get("size", -1)) >= rec.size
        if copy and (rec.read_write or (rec.writer and not grown)):
            out.actions.append(Action("write", rec.path, copy, rec.size, rec.mode, rec.mtime_ns,
                                      "rewritten since the image: its saved content put back"))
        elif grown:
            if now.get("size") != rec.size:
                out.actions.append(Action("truncate", rec.path, size=rec.size, mtime_ns=rec.mtime_ns,
                                          why=f"cut back from {now.get('size')} to {rec.size} bytes"))
        else:  # a file the job only read: its copy serves if it is deleted, never over another's edit
            out.problems.append(f"{rec.path}: {_describe(rec, now)} (the job only read it; "
                                "another party changed it)")
        return
    what = "deleted" if not now.get("exists") else "replaced by another file"
    pin = _pin_path(pin_root, state, rec)
    if pin is not None:
        try:
            st = os.stat(pin, follow_symlinks=False)
        except OSError:
            st = None
        if st is not None and (st.st_dev, st.st_ino) == (rec.dev, rec.ino) and (
                (rec.writer and st.st_size >= rec.size) or (st.st_size, st.st_mtime_ns) == (rec.size, rec.mtime_ns)):
            out.actions.append(Action("link", rec.path, pin, rec.size if rec.writer else -1, rec.mode,
                                      rec.mtime_ns, f"{what} since the image: brought back"))
            return
    if copy:
        out.actions.append(Action("write", rec.path, copy, rec.size, rec.mode, rec.mtime_ns,
                                  f"{what} since the image: its saved content put back"))
        return
    out.problems.append(f"{rec.path}: {what} since the image, and the image holds no copy of it")


def _pin_path(pin_root: Path | None, state: FileState, rec: FileRecord) -> str | None:
    if pin_root is None or not state.pins or not rec.pin:
        return None
    return str(pin_root / state.pins / rec.pin)


@dataclass
class PreparedFiles:
    """What CRIU's restore needs after the files are back: fds standing in for files."""

    inherit: dict[int, str] = field(default_factory=dict)  # fd -> CRIU key
    report: list[str] = field(default_factory=list)

    def close(self) -> None:
        for fd in self.inherit:
            try:
                os.close(fd)
            except OSError:
                pass
        self.inherit.clear()


def prepare(images_dir: Path, *, node: str, uid: int, gids: Sequence[int], pin_root: Path | None,
            work: Path) -> PreparedFiles:
    """Bring the job's files back to the image's record, or FileStateRefused naming them.

    `work`: a root-only directory that outlives the restore call, for copies that stand
    in for node-local files the owner cannot create at their path (the batch script in
    slurmd's spool directory of another node): they are handed to CRIU as fds.
    """
    prepared = PreparedFiles()
    state = FileState.read(images_dir)
    if state is None:
        return prepared
    p = plan(state, images_dir, node=node, uid=uid, gids=gids, pin_root=pin_root)
    if p.problems:
        raise FileStateRefused("; ".join(p.problems[:5]) + (f" (and {len(p.problems) - 5} more)"
                                                             if len(p.problems) > 5 else ""))
    results = _apply(p.actions, uid, gids)
    for rec in state.records:
        if rec.external:
            if rec.saved is None:
                prepared.close()
                raise FileStateRefused(f"{rec.path}: held from outside the job's mount namespace "
                                       "and not saved in the image")
            prepared.inherit[_stand_in(rec, images_dir, uid, gids, work)] = rec.external
            prepared.report.append(f"{rec.path}: handed over again from the image")
    by_path = {r.path: r for r in state.records}
    for action, result in zip(p.actions, results):
        if result.get("ok"):
            if action.op != "mkdir":
                prepared.report.append(f"{action.path}: {action.why}")
            continue
        rec = by_path.get(action.path)
        if action.op == "write" and rec is not None and rec.node_local and rec.held and result.get("errno") in (
                errno.EACCES, errno.EPERM, errno.ENOENT, errno.EROFS, errno.ENOTDIR):
            fd = _stand_in(rec, images_dir, uid, gids, work)
            prepared.inherit[fd] = rec.path.lstrip("/")
            prepared.report.append(f"{rec.path}: handed over from the image (its owner cannot create it here)")
            continue
        if action.op == "mkdir":
            continue  # CRIU names the file if it really needed the directory
        prepared.close()
        raise FileStateRefused(f"{action.path}: could not be brought back to the image's state "
                               f"({result.get('error', 'unknown error')})")
    return prepared


def _apply(actions: list[Action], uid: int, gids: Sequence[int]) -> list[dict[str, Any]]:
    """Carry out `actions` as the owner; root only opens its own copies and pins for it."""
    if not actions:
        return []
    fds: list[int] = []
    try:
        items = []
        for a in actions:
            item = asdict(a)
            if a.source is not None:
                fd = os.open(a.source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                os.set_inheritable(fd, True)
                fds.append(fd)
                item["source_fd"] = fd
            item.pop("source", None)
            items.append(item)
        answer = _as_owner({"op": "apply", "actions": items}, uid, gids, fds)
    finally:
        for fd in fds:
            os.close(fd)
    results = answer.get("results")
    if not isinstance(results, list) or len(results) != len(actions):
        raise FileStateRefused("putting the job's files back as its owner gave no answer")
    return results


def _stand_in(rec: FileRecord, images_dir: Path, uid: int, gids: Sequence[int], work: Path) -> int:
    """An fd on an owner-owned copy of a node-local file, positioned as the job had it."""
    work.mkdir(mode=0o711, exist_ok=True)
    path = work / f"file-{rec.ino}-{os.urandom(4).hex()}"
    fd_src = os.open(images_dir / str(rec.saved), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        made = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            while chunk := os.read(fd_src, 1 << 20):
                os.write(made, chunk)
            os.fchown(made, uid, (list(gids) or [uid])[0])
            os.fchmod(made, stat.S_IMODE(rec.mode) & 0o777)  # never a set-id copy
            # Reopened through the fd just made (no path lookup) and with the job's own
            # flags only: an O_NOFOLLOW kept in the fd's flags would make CRIU fail to
            # reopen it at the next restore (it reopens files through /proc/self/fd).
            flags = rec.flags & (os.O_ACCMODE | os.O_APPEND)
            fd = os.open(f"/proc/self/fd/{made}", flags)
        finally:
            os.close(made)
    finally:
        os.close(fd_src)
    os.unlink(path)  # the job holds an owner-owned file of its own, reachable by no path of root's
    if not flags & os.O_APPEND:
        os.lseek(fd, rec.pos, os.SEEK_SET)
    return fd


def main(argv: Sequence[str]) -> int:
    """Entry of the post-dump action: `filestate.py capture SPEC.json`."""
    if len(argv) != 2 or argv[0] != "capture":
        print("usage: filestate.py capture SPEC.json", file=sys.stderr)
        return 2
    from slurm_mm.engine.proctree import tree_pids  # noqa: PLC0415

    spec = CaptureSpec(**json.loads(Path(argv[1]).read_text()))
    state = capture(spec, tree_pids(spec.init_pid))
    print(f"slurm_mm filestate: {len(state.records)} files, {state.saved_bytes} bytes saved", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
