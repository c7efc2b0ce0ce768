"""The raw tools slurm_mm is measured against: `criu dump`/`criu restore` run by hand on
the same tree, and `dd` writing and reading the same bytes on the same filesystem.

Every function returns the wall time of the tool itself (process start included: that
is what an admin running the tool pays too).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from app import BenchError

CRIU = Path(os.environ.get("SLURM_MM_BENCH_CRIU", "/opt/slurm_mm/criu/sbin/criu"))
# The flags a job's tree needs (the engine's, so both sides dump the same way; FACTS.md).
try:
    from slurm_mm.engine.criu import COMMON_FLAGS as _FLAGS
    DUMP_FLAGS = list(_FLAGS)
except ImportError:  # an engine-less checkout: the flags that mattered in FACTS.md
    DUMP_FLAGS = ["--file-locks", "--tcp-established", "--network-lock", "skip", "--ext-unix-sk",
                  "--manage-cgroups=ignore"]


def _dump_env() -> dict[str, str]:
    """criu's environment: as given, plus the prlimit shim where root lacks
    CAP_SYS_RESOURCE (this VM; FACTS.md), which user-owned trees need for any dump."""
    env = dict(os.environ)
    try:
        from slurm_mm.engine import native
        if not native.has_cap_sys_resource():
            env["LD_PRELOAD"] = str(native.find(native.PRLIMIT_SHIM))
    except Exception:  # noqa: BLE001 - no engine or no shim built: root-owned trees need none
        pass
    return env


def criu_version() -> str:
    try:
        out = subprocess.run([str(CRIU), "--version"], capture_output=True, text=True, timeout=20).stdout
    except OSError as exc:
        return f"unavailable ({exc.strerror})"
    return " ".join(out.split())


def _criu(argv: list[str], log_dir: Path, log: str, env: dict[str, str] | None = None,
          verbosity: str = "-v2") -> float:
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    done = subprocess.run([str(CRIU), *argv, "-W", str(log_dir), "-o", log, verbosity],
                          capture_output=True, text=True, timeout=900, env=env)
    elapsed = time.monotonic() - t0
    if done.returncode:
        tail = ""
        try:
            tail = " | ".join((log_dir / log).read_text().strip().splitlines()[-3:])
        except OSError:
            pass
        raise BenchError(f"criu {argv[0]} failed (rc {done.returncode}): {tail or done.stderr.strip()[-300:]}")
    return elapsed


def criu_dump(pid: int, images: Path, log_dir: Path, *, leave: str | None = None,
              extra: list[str] | None = None, verbosity: str = "-v2") -> float:
    """`criu dump -t PID -D images`; leave: None (the tree dies), "running" or "stopped".
    verbosity: CRIU's log level (-v2 is its default; slurm_mm's engine logs at -v4)."""
    images.mkdir(parents=True, exist_ok=True)
    argv = ["dump", "-t", str(pid), "-D", str(images), *DUMP_FLAGS, *(extra or [])]
    if leave == "running":
        argv.append("--leave-running")
    elif leave == "stopped":
        argv.append("--leave-stopped")
    return _criu(argv, log_dir, "dump.log", env=_dump_env(), verbosity=verbosity)


def criu_restore(images: Path, log_dir: Path) -> tuple[int, float]:
    """`criu restore -d --restore-sibling`: the restored root becomes our child. Returns
    (its host PID, seconds)."""
    pidfile = log_dir / "restore.pid"
    pidfile.unlink(missing_ok=True)
    elapsed = _criu(["restore", "-d", "-D", str(images), "--restore-sibling", *DUMP_FLAGS,
                     "--pidfile", str(pidfile)], log_dir, "restore.log")
    return int(pidfile.read_text().split()[0]), elapsed


def tree(pid: int) -> list[int]:
    """PIDs of a process tree, root first (from /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo.extend(int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def resume(pids: list[int]) -> None:
    """SIGCONT a tree left stopped by `criu dump --leave-stopped`."""
    for p in pids:
        try:
            os.kill(p, signal.SIGCONT)
        except ProcessLookupError:
            pass


def files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file())


def size_of(directory: Path) -> int:
    return sum(p.stat().st_size for p in files(directory))


def dd_copy_dir(src: Path, dst: Path, *, fsync: bool = True) -> float:
    """Copy every file of src into the new directory dst with `dd bs=4M` (conv=fsync when
    fsync), then fsync dst: a raw, durable sequential write of the same bytes."""
    dst.mkdir(parents=True)
    t0 = time.monotonic()
    for f in files(src):
        argv = ["dd", f"if={f}", f"of={dst / f.name}", "bs=4M", "status=none"]
        if fsync:
            argv.append("conv=fsync")
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode:
            raise BenchError(f"dd {f} failed: {done.stderr.strip()}")
    if fsync:
        fd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.monotonic() - t0


def evict(path: Path) -> None:
    """Drop a directory's (clean) file pages from the page cache, so that the next read
    comes from the disk, without touching anyone else's cache (no drop_caches)."""
    for f in path.rglob("*"):
        if f.is_file() and not f.is_symlink():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
