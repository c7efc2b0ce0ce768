"""Refuse a restored tree that would run as anyone but the job's owner (DESIGN invariant 3).

criu runs this as its --action-script during `criu restore`. At the "pre-resume" stage
every restored task exists with its credentials applied, but is stopped before its first
instruction from the image. This checks the credentials of every thread of the tree:
- the namespace init (NSpid 1) may be root (mm-init is root by design) or the owner;
- every other thread must have all four uids equal to the owner's, all gids and
  supplementary groups among the owner's groups, and no capabilities.
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
import sys


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


def problems(root: int, uid: int, gids: set[int]) -> tuple[list[str], int]:
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
                caps = [int(st[k], 16) for k in ("CapPrm", "CapEff", "CapAmb") if k in st]
            except (KeyError, ValueError):
                found.append(f"pid {pid} tid {tid}: unreadable status")
                continue
            if ns_pid == 1 and pid == root and tid == pid:
                if set(uids) not in ({0}, {uid}):
                    found.append(f"init pid {pid}: uids {uids}, expected root or {uid}")
                continue
            if set(uids) != {uid}:
                found.append(f"pid {pid} tid {tid}: uids {uids}, expected {uid}")
            bad_gids = sorted(set(tgids + groups) - gids)
            if bad_gids:
                found.append(f"pid {pid} tid {tid}: groups {bad_gids} are not the owner's")
            if any(caps):
                found.append(f"pid {pid} tid {tid}: has capabilities")
    if seen == 0:
        found.append(f"no restored task found under pid {root}")
    return found, seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="owner_check")
    parser.add_argument("--uid", type=int, required=True)
    parser.add_argument("--gids", required=True, help="comma-separated gids the owner may hold")
    parser.add_argument("--verdict", required=True, help="file to write the JSON verdict into")
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
        found, seen = problems(root, args.uid, gids)
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
