"""Refuse a restored tree that would run as anyone but the job's owner,
or that holds anything its owner could not have opened (docs/security.md).

criu runs this as its --action-script during `criu restore`. At the "pre-resume" stage
every restored task exists with its credentials applied and its files open, but is
stopped before its first instruction from the image. This checks every thread of the tree:
- the namespace init (NSpid 1) may be root only when its executable is the installed
  mm-init (`--init-exe`, same inode), else it must be the owner;
- every other thread must have all four uids equal to the owner's, all gids and
  supplementary groups among the owner's groups, and no capabilities (permitted,
  effective, inheritable, ambient);
- root CRIU opened the tree's files by the paths in the image, and the owner may have
  swapped a directory on such a path for a symlink to somewhere only root can read.
  So every fd, file mapping, cwd and root of every task, and the directory of every
  unix socket it has bound, is looked up again by its path from the task's own root,
  by a child process that has become the owner (uid, gid, groups; no capabilities):
  it must reach the same inode (device and inode number) and be allowed the access the
  task has (read/write as opened or mapped, search for cwd/root, write+search for a
  socket's directory). A deleted file is judged by its mode and owner alone.
If anything else is found, it stops every task (SIGSTOP) so that none runs an
instruction from the image, and writes why into the verdict file; the restorer reads
it and SIGKILLs the stopped tree. CRIU ignores an action script's exit code at this
stage, so the stop is what enforces the refusal.

What it trusts: /proc (kernel-written), its argv and CRTOOLS_* variables (set by criu,
which the root restorer started with a clean environment). Standalone (stdlib only, run
with `python -I`): it must not import anything from the image's or a user's directories.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import stat
import sys
from dataclasses import dataclass


def _status(pid: int, tid: int) -> dict[str, str] | None:
    try:
        with open(f"/proc/{pid}/task/{tid}/status", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


def _tids(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return []


def _tree(root: int) -> list[int]:
    order, seen, todo = [], set(), [root]
    while todo:
        pid = todo.pop(0)
        if pid in seen:
            continue
        seen.add(pid)
        order.append(pid)
        for tid in _tids(pid):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except OSError:
                pass
    return order


def _same_file(a: str, b: str) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _bounding(st: dict[str, str]) -> int:
    try:
        return int(st.get("CapBnd", "0"), 16)
    except ValueError:
        return -1  # unreadable: wider than anything


def _own_bounding() -> int:
    """The checker's bounding set: a job's tasks inherit the agent's through mm-init, so a
    restored task may have no bit the checker lacks (a bit beyond it would let an exec of
    a file-capability program gain more than the job could at launch)."""
    return _bounding(_status(os.getpid(), os.getpid()) or {})


def problems(root: int, uid: int, gids: set[int], init_exes: list[str] | None = None) -> tuple[list[str], int]:
    """What is wrong with the tree under `root` (empty: fine), and how many threads were seen."""
    found: list[str] = []
    seen = 0
    for pid in _tree(root):
        for tid in _tids(pid):
            st = _status(pid, tid)
            if st is None:
                continue
            seen += 1
            try:
                ns_pid = int(st["NSpid"].split()[-1])
                uids = [int(x) for x in st["Uid"].split()]
                tgids = [int(x) for x in st["Gid"].split()]
                groups = [int(x) for x in st.get("Groups", "").split()]
                caps = [int(st[k], 16) for k in ("CapPrm", "CapEff", "CapInh", "CapAmb") if k in st]
            except (KeyError, ValueError):
                found.append(f"pid {pid} tid {tid}: unreadable status")
                continue
            if ns_pid == 1 and pid == root and tid == pid and set(uids) == {0}:
                if init_exes is not None and not any(_same_file(f"/proc/{pid}/exe", e) for e in init_exes):
                    found.append(f"init pid {pid} runs as root but is not the installed mm-init "
                                 f"({', '.join(init_exes) or 'none found'})")
                continue
            if set(uids) != {uid}:
                found.append(f"pid {pid} tid {tid}: uids {uids}, expected {uid}")
            bad_gids = sorted(set(tgids + groups) - gids)
            if bad_gids:
                found.append(f"pid {pid} tid {tid}: groups {bad_gids} are not the owner's")
            if any(caps):
                found.append(f"pid {pid} tid {tid}: has capabilities")
            wider = _bounding(st) & ~_own_bounding()
            if wider:
                found.append(f"pid {pid} tid {tid}: capability bounding set {wider:#x} wider than a job's")
    if seen == 0:
        found.append(f"no restored task found under pid {root}")
    return found, seen


# ---------------------------------------------------------------- what the tree holds

R, W, X = os.R_OK, os.W_OK, os.X_OK
_VERB = {R: "read", W: "write", R | W: "read and write", X: "search", W | X: "create files in"}


@dataclass(frozen=True)
class Held:
    """Something a task holds by path: looked up again by the owner from the task's root."""

    label: str  # e.g. "pid 12 fd 3"
    root_key: str  # the task's mount namespace + root, to share one root fd per tree
    path: str  # absolute, as the task sees it
    need: int  # R/W/X bits the owner must have on it
    ident: tuple[int, int] | None  # (st_dev, st_ino) it must be; None: any (socket dirs)


def _fd_flags(pid: int, fd: str) -> int:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("flags:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def unix_paths(pid: int) -> dict[int, str]:
    """Socket inode -> path it is bound to (abstract and unbound ones left out)."""
    out: dict[int, str] = {}
    try:
        with open(f"/proc/{pid}/net/unix") as f:
            next(f, None)
            for line in f:
                fields = line.split(None, 7)
                if len(fields) == 8 and not fields[7].startswith("@"):
                    out[int(fields[6])] = fields[7].rstrip("\n")
    except (OSError, ValueError):
        pass
    return out


def _need_for_access(flags: int) -> int:
    if flags & os.O_PATH:
        return 0
    return {os.O_RDONLY: R, os.O_WRONLY: W, os.O_RDWR: R | W}.get(flags & os.O_ACCMODE, R | W)


def _owner_may(st: os.stat_result, need: int, uid: int, gids: set[int]) -> bool:
    """Mode bits alone (for deleted files): what the owner would be allowed."""
    if st.st_uid == uid:
        bits = (st.st_mode >> 6) & 7
    elif st.st_gid in gids:
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    return bits & need == need


def held_by(pid: int, uid: int, gids: set[int]) -> tuple[list[Held], list[str]]:
    """Everything task `pid` holds by path, and problems found without a lookup (deleted files)."""
    items: list[Held] = []
    found: list[str] = []
    try:
        rst = os.stat(f"/proc/{pid}/root")
        root_key = f"{os.readlink(f'/proc/{pid}/ns/mnt')}|{rst.st_dev}|{rst.st_ino}"
    except OSError:
        return items, [f"pid {pid}: cannot read its mount namespace or root"]

    def add(label: str, target: str, st: os.stat_result, need: int) -> None:
        if target.endswith(" (deleted)"):
            if target.startswith("/memfd:") or _owner_may(st, need, uid, gids):
                return
            found.append(f"{label}: deleted file {target[:-10]} may not be opened by uid {uid}")
        elif target.startswith("/"):
            items.append(Held(label, root_key, target, need, (st.st_dev, st.st_ino)))

    for name, need in (("cwd", X), ("root", X)):
        try:
            add(f"pid {pid} {name}", os.readlink(f"/proc/{pid}/{name}"), os.stat(f"/proc/{pid}/{name}"), need)
        except OSError:
            found.append(f"pid {pid}: cannot read its {name}")
    bound = None
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        fds = []
        found.append(f"pid {pid}: cannot list its fds")
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if stat.S_ISSOCK(st.st_mode):
            bound = unix_paths(pid) if bound is None else bound
            path = bound.get(st.st_ino)
            if path:
                if not path.startswith("/"):
                    path = os.path.join(os.readlink(f"/proc/{pid}/cwd"), path)
                items.append(Held(f"pid {pid} fd {fd} (unix socket {path})", root_key,
                                  os.path.dirname(path) or "/", W | X, None))
            continue
        add(f"pid {pid} fd {fd}", target, st, _need_for_access(_fd_flags(pid, fd)))
    maps: list[str] = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            maps = f.read().splitlines()
    except OSError:
        found.append(f"pid {pid}: cannot read its maps")
    seen: set[tuple[str, int]] = set()
    for line in maps:
        fields = line.split(None, 5)
        if len(fields) < 6 or not fields[5].startswith("/"):
            continue
        perms, target = fields[1], fields[5]
        need = R | (W if "w" in perms and "s" in perms else 0)
        if (target, need) in seen:
            continue
        seen.add((target, need))
        try:
            st = os.stat(f"/proc/{pid}/map_files/{fields[0]}")
        except OSError:
            continue
        add(f"pid {pid} mapping", target, st, need)
    return items, found


def _check_as_owner(items: list[Held], root_fds: dict[str, int]) -> list[str]:
    """Runs in a child that is the owner: each item's path, looked up from its task's root."""
    found = []
    for item in items:
        rel = item.path.lstrip("/") or "."
        try:
            fd = os.open(rel, os.O_PATH | os.O_CLOEXEC, dir_fd=root_fds[item.root_key])
        except OSError as exc:
            found.append(f"{item.label}: {item.path}: its owner cannot reach it ({exc.strerror})")
            continue
        try:
            st = os.fstat(fd)
            if item.ident is not None and (st.st_dev, st.st_ino) != item.ident:
                found.append(f"{item.label}: {item.path} is not the file its owner finds at that path")
            elif item.need and not os.access(f"/proc/self/fd/{fd}", item.need):
                found.append(f"{item.label}: {item.path}: its owner may not "
                             f"{_VERB.get(item.need, 'use')} it")
        finally:
            os.close(fd)
    return found


def _as_owner(uid: int, gids: set[int], work, *args) -> list[str]:
    """work(*args) in a child that has become `uid` with `gids` (no capabilities left)."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(r)
        try:
            groups = sorted(gids)
            os.setgroups(groups)
            os.setresgid(groups[0], groups[0], groups[0])
            os.setresuid(uid, uid, uid)
            out = work(*args)
        except BaseException as exc:  # noqa: BLE001 - any failure is a refusal, never a pass
            out = [f"the check as uid {uid} failed: {exc}"]
        data = json.dumps(out).encode()
        while data:
            data = data[os.write(w, data):]
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(child, 0)
    try:
        result = json.loads(b"".join(chunks))
    except ValueError:
        return [f"the check as uid {uid} gave no answer"]
    return [str(p) for p in result] if isinstance(result, list) else [f"the check as uid {uid} gave no answer"]


def file_problems(root: int, uid: int, gids: set[int], given: set[tuple[int, ...]] = frozenset()) -> list[str]:
    """What the tree under `root` holds that its owner could not open at its path now.
    `given`: (st_dev, st_ino) of files the restorer itself handed the tree (not looked up)."""
    found: list[str] = []
    items: list[Held] = []
    root_fds: dict[str, int] = {}
    try:
        for pid in _tree(root):
            held, bad = held_by(pid, uid, gids)
            found += bad
            for item in held:
                if item.root_key not in root_fds:
                    root_fds[item.root_key] = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            items += [i for i in held if i.ident not in given]
        unique = list({(i.root_key, i.path, i.need, i.ident): i for i in items}.values())
        found += _as_owner(uid, gids, _check_as_owner, unique, root_fds)
    except OSError as exc:
        found.append(f"cannot inspect the restored tree: {exc}")
    finally:
        for fd in root_fds.values():
            os.close(fd)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="owner_check")
    parser.add_argument("--uid", type=int, required=True)
    parser.add_argument("--gids", required=True, help="comma-separated gids the owner may hold")
    parser.add_argument("--verdict", required=True, help="file to write the JSON verdict into")
    parser.add_argument("--init-exe", action="append", default=[],
                        help="an installed mm-init: the only executables a root namespace init may run")
    parser.add_argument("--given", action="append", default=[],
                        help="DEV:INO of a file the restorer handed the tree (--inherit-fd): not looked up")
    args = parser.parse_args(argv)
    if os.environ.get("CRTOOLS_SCRIPT_ACTION") != "pre-resume":
        return 0
    gids = {int(g) for g in args.gids.split(",") if g}
    try:
        root = int(os.environ["CRTOOLS_INIT_PID"])
    except (KeyError, ValueError):
        verdict = {"ok": False, "problems": ["criu gave no CRTOOLS_INIT_PID"]}
        root = 0
    else:
        found, seen = problems(root, args.uid, gids, args.init_exe)
        if not found:
            given = {tuple(int(x) for x in g.split(":")) for g in args.given}
            found = file_problems(root, args.uid, gids, given)
        verdict = {"ok": not found, "problems": found, "threads": seen, "root": root}
    if not verdict["ok"] and root > 0:
        # SIGSTOP, not SIGKILL: a killed namespace init would wait for children that
        # criu still traces while criu waits for it (measured: deadlock). A stop queued
        # now is taken when criu detaches, on the way back to user mode, before the first
        # instruction from the image; the restorer then kills the stopped tree.
        for pid in _tree(root):
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
    fd = os.open(args.verdict, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(verdict, f)
    # 0 either way: the verdict file carries the refusal; a failing script would send
    # criu down its own kill path, racing the stop above.
    return 0


if __name__ == "__main__":
    sys.exit(main())
