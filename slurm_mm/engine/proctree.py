"""What /proc says about a job's process tree: its PIDs, namespace PIDs, ids, stdio.

Read-only and root-safe: it reads files the kernel writes under /proc and never acts on
a process. Races are normal here (a process may exit between two reads); every reader
treats a vanished process as gone, never as an error.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class TaskIds:
    """Credentials of one thread, as /proc/PID/task/TID/status shows them."""

    pid: int
    tid: int
    ns_pid: int  # PID in the innermost PID namespace (1 for a namespace init)
    uids: tuple[int, int, int, int]  # real, effective, saved, fs
    gids: tuple[int, int, int, int]
    groups: tuple[int, ...]
    cap_prm: int
    cap_eff: int
    cap_amb: int
    state: str  # one letter: R S D T t Z ...


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def _status_fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip()
    return fields


def threads(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except (FileNotFoundError, ProcessLookupError):
        return []


def children(pid: int) -> list[int]:
    """Direct children of every thread of `pid`."""
    found: list[int] = []
    for tid in threads(pid):
        text = _read(f"/proc/{pid}/task/{tid}/children")
        if text:
            found.extend(int(c) for c in text.split())
    return found


def tree_pids(root: int) -> list[int]:
    """`root` and all its descendants (host PIDs), parents before children."""
    order, seen, todo = [], set(), [root]
    while todo:
        pid = todo.pop(0)
        if pid in seen or not os.path.exists(f"/proc/{pid}"):
            continue
        seen.add(pid)
        order.append(pid)
        todo.extend(children(pid))
    return order


def task_ids(pid: int, tid: int | None = None) -> TaskIds | None:
    """Credentials of a thread (the main thread by default); None if it is gone."""
    tid = pid if tid is None else tid
    text = _read(f"/proc/{pid}/task/{tid}/status")
    if text is None:
        return None
    f = _status_fields(text)
    try:
        ns = f.get("NSpid", str(pid)).split()
        return TaskIds(
            pid=pid,
            tid=tid,
            ns_pid=int(ns[-1]),
            uids=tuple(int(x) for x in f["Uid"].split()),  # type: ignore[arg-type]
            gids=tuple(int(x) for x in f["Gid"].split()),  # type: ignore[arg-type]
            groups=tuple(int(x) for x in f.get("Groups", "").split()),
            cap_prm=int(f["CapPrm"], 16),
            cap_eff=int(f["CapEff"], 16),
            cap_amb=int(f.get("CapAmb", "0"), 16),
            state=f.get("State", "?")[:1],
        )
    except (KeyError, ValueError, IndexError):
        return None


def ns_pid(pid: int) -> int | None:
    ids = task_ids(pid)
    return ids.ns_pid if ids else None


def ns_pid_map(root: int) -> dict[int, int]:
    """Namespace PID -> host PID for every process of the tree under `root`."""
    mapping = {}
    for pid in tree_pids(root):
        inner = ns_pid(pid)
        if inner is not None:
            mapping[inner] = pid
    return mapping


def frozen_cgroup(pid: int) -> str | None:
    """The v1 freezer cgroup of `pid` if it is FROZEN or FREEZING, else None."""
    text = _read(f"/proc/{pid}/cgroup") or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and "freezer" in parts[1].split(","):
            state = _read(f"/sys/fs/cgroup/freezer{parts[2]}/freezer.state")
            if state and state.strip() in ("FROZEN", "FREEZING"):
                return parts[2]
    return None


@dataclass(frozen=True)
class OpenFile:
    """Where one fd of a process points, and the key CRIU's --inherit-fd knows it by."""

    fd: int
    target: str  # readlink of /proc/PID/fd/N
    kind: str  # file, pipe, socket, tty, anon, deleted
    criu_key: str | None  # None: CRIU cannot take this one from an inherited fd

    def to_json(self) -> dict:
        return {"fd": self.fd, "target": self.target, "kind": self.kind, "criu_key": self.criu_key}

    @classmethod
    def from_json(cls, d: dict) -> OpenFile:
        return cls(int(d["fd"]), str(d["target"]), str(d["kind"]), d.get("criu_key"))


# Character-device majors of terminals: CRIU keys them as tty[rdev:dev].
_TTY_MAJORS = {4, 5} | set(range(136, 144))


def open_file(pid: int, fd: int) -> OpenFile | None:
    """Describe fd `fd` of `pid`; None if it is not open (or the process is gone).

    CRIU's keys (criu(8), --inherit-fd): a regular file is its path without the leading
    '/', a pipe `pipe:[INO]`, a socket `socket:[INO]`, a terminal `tty[RDEV:DEV]` (hex).
    """
    path = f"/proc/{pid}/fd/{fd}"
    try:
        target = os.readlink(path)
        st = os.stat(path)
    except (FileNotFoundError, ProcessLookupError):
        return None
    if target.startswith("pipe:["):
        return OpenFile(fd, target, "pipe", target)
    if target.startswith("socket:["):
        return OpenFile(fd, target, "socket", target)
    if target.endswith(" (deleted)"):
        return OpenFile(fd, target, "deleted", None)
    if not target.startswith("/"):
        return OpenFile(fd, target, "anon", None)
    if stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) in _TTY_MAJORS:
        return OpenFile(fd, target, "tty", f"tty[{st.st_rdev:x}:{st.st_dev:x}]")
    return OpenFile(fd, target, "file", target.lstrip("/"))


def exe_name(pid: int) -> str:
    """The executable's name from /proc/PID/exe, which argv[0] games cannot change;
    "" when it cannot be read (the process is gone, or not ours to read)."""
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")).removesuffix(" (deleted)")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return False
    # The state letter follows the last ')' (comm may contain spaces and parens).
    return text[text.rfind(")") + 2 : text.rfind(")") + 3] not in ("Z", "X", "")


def wait_gone(pids: Iterable[int], timeout: float, *, zombies_count: bool = True) -> list[int]:
    """Wait until none of `pids` exists; returns those still there after `timeout` s.

    After a kill, this host's PID 1 reaps orphaned zombies 1.2-1.6 s late (docs/design.md, measured facts), so
    a PID stays taken for a while after its process died. With `zombies_count=False` a
    zombie counts as gone (the process is dead, only its PID is still taken).
    """
    pending = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        if zombies_count:
            pending = [p for p in pending if os.path.exists(f"/proc/{p}")]
        else:
            pending = [p for p in pending if alive(p)]
        if not pending or time.monotonic() >= deadline:
            return pending
        time.sleep(0.02)
