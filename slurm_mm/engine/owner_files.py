"""Changes to a job's files, made with the job owner's credentials (run, never imported).

The node agent (root) starts this script with the owner's uid, gid and groups and a
fixed environment, feeds it one JSON request on stdin and reads one JSON answer on
stdout. Every path here is a path the user controls, so every lookup, create, link and
truncate is the kernel checking the owner's rights, never root's. Content comes from
file descriptors root opened on its own copies and pins (passed in, inheritable).

Standard library only: it runs before anything of the job is restored.

    {"op": "probe", "paths": [...], "hash": [...]}   -> {path: {exists, dev, ino, size, ...}}
    {"op": "apply", "actions": [{op, path, source_fd, size, mode, mtime_ns}, ...]}
                                                     -> {"results": [{ok, error, errno}, ...]}
    {"op": "sockdirs", "paths": [...]}               -> {path: {ok, error}}: may the owner
                                                        bind a unix socket at path now?
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import stat
import sys
from typing import Any

CHUNK = 1 << 20


def probe(path: str, want_hash: bool) -> dict[str, Any]:
    try:
        st = os.stat(path)
    except OSError as exc:
        return {"exists": False, "errno": exc.errno}
    out: dict[str, Any] = {"exists": True, "dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
                           "mtime_ns": st.st_mtime_ns, "mode": st.st_mode, "regular": stat.S_ISREG(st.st_mode)}
    if want_hash and stat.S_ISREG(st.st_mode):
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
            out["sha256"] = digest.hexdigest()
        except OSError as exc:
            out["hash_error"] = exc.strerror
    return out


def sockdir(path: str) -> dict[str, Any]:
    """Whether the owner may (re)bind a socket at `path`: its directory, as the owner
    resolves it, is a directory they may search and write."""
    parent = os.path.dirname(path) or "/"
    try:
        if not stat.S_ISDIR(os.stat(parent).st_mode):
            return {"ok": False, "error": f"{parent} is not a directory"}
    except OSError as exc:
        return {"ok": False, "error": f"{parent}: {exc.strerror}"}
    if not os.access(parent, os.W_OK | os.X_OK):
        return {"ok": False, "error": f"{os.path.realpath(parent)} is not writable by the owner"}
    return {"ok": True}


def _temp_beside(path: str) -> str:
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.slurm_mm-{os.urandom(4).hex()}")


def _finish(tmp: str, path: str, mode: int, mtime_ns: int) -> None:
    os.chmod(tmp, stat.S_IMODE(mode) or 0o600)
    os.utime(tmp, ns=(mtime_ns, mtime_ns))
    os.rename(tmp, path)


def write(path: str, source_fd: int, size: int, mode: int, mtime_ns: int) -> None:
    """Replace `path` with the first `size` bytes of `source_fd` (atomic: temp + rename)."""
    os.makedirs(os.path.dirname(path) or "/", mode=0o700, exist_ok=True)
    tmp = _temp_beside(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        offset = 0
        while offset < size:
            chunk = os.pread(source_fd, min(CHUNK, size - offset), offset)
            if not chunk:
                raise OSError(5, f"the saved copy ends at {offset} of {size} bytes")
            os.write(fd, chunk)
            offset += len(chunk)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    _finish(tmp, path, mode, mtime_ns)


def link(path: str, source_fd: int, size: int, mode: int, mtime_ns: int) -> None:
    """Put the pinned inode back at `path` (cut to `size` if >= 0); a copy if it cannot link."""
    os.makedirs(os.path.dirname(path) or "/", mode=0o700, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.linkat(-100, os.fsencode(f"/proc/self/fd/{source_fd}"), -100, os.fsencode(tmp), 0x400) != 0:
            raise OSError(ctypes.get_errno(), "linkat")  # AT_FDCWD, AT_SYMLINK_FOLLOW
    except OSError:
        length = size if size >= 0 else os.fstat(source_fd).st_size
        write(path, source_fd, length, mode, mtime_ns)
        return
    if size >= 0:
        os.truncate(tmp, size)
    os.utime(tmp, ns=(mtime_ns, mtime_ns))
    os.rename(tmp, path)


def apply(action: dict[str, Any]) -> None:
    op, path = action["op"], action["path"]
    if op == "mkdir":  # only a directory made here gets the image's mode (CRIU compares a cwd's)
        if not os.path.isdir(path):
            os.makedirs(path, mode=0o700, exist_ok=True)
            os.chmod(path, action["mode"] & 0o777)
    elif op == "write":
        write(path, action["source_fd"], action["size"], action["mode"], action["mtime_ns"])
    elif op == "link":
        link(path, action["source_fd"], action["size"], action["mode"], action["mtime_ns"])
    elif op == "truncate":
        os.truncate(path, action["size"])
        os.utime(path, ns=(action["mtime_ns"], action["mtime_ns"]))
    else:
        raise ValueError(f"unknown op {op!r}")


def main() -> int:
    request = json.loads(sys.stdin.read())
    if request.get("op") == "probe":
        hashes = set(request.get("hash", []))
        answer: dict[str, Any] = {p: probe(p, p in hashes) for p in request.get("paths", [])}
    elif request.get("op") == "sockdirs":
        answer = {p: sockdir(p) for p in request.get("paths", [])}
    elif request.get("op") == "apply":
        results = []
        for action in request.get("actions", []):
            try:
                apply(action)
                results.append({"ok": True})
            except OSError as exc:
                results.append({"ok": False, "errno": exc.errno, "error": f"{exc.strerror or exc}"})
            except (KeyError, TypeError, ValueError) as exc:
                results.append({"ok": False, "errno": 0, "error": f"bad action: {exc}"})
        answer = {"results": results}
    else:
        answer = {"error": f"unknown request {request.get('op')!r}"}
    json.dump(answer, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
