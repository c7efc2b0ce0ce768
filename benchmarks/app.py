"""The benchmark workload (workload.c): build it, start it, read what it measured itself.

The app is the only judge of what a checkpoint cost it: it logs every stall between two
of its iterations and counts its iterations (stats file, see workload.c). The harness
only brackets its own actions with time.monotonic_ns() (the app's clock) and asks the
app which stalls fell in that window.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "workload.c"
OUT = HERE / "out"
BINARY = OUT / "bench-app"


class BenchError(Exception):
    """A benchmark could not run (one line, says what and why)."""


def build() -> Path:
    """Compile bench-app into benchmarks/out/ unless it is up to date."""
    if BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return BINARY
    OUT.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(BINARY), str(SOURCE)],
                          capture_output=True, text=True)
    if done.returncode:
        raise BenchError(f"cannot build {BINARY}: {done.stderr.strip()[-400:]}")
    return BINARY


def fill_file(path: Path, mib: int, random_pct: int, layout: str = "interleaved") -> None:
    """Write `mib` MiB of the app's memory content to `path` (no process, no CRIU)."""
    done = subprocess.run([str(build()), "--fill-file", str(path), "--mem-mib", str(mib),
                           "--random-pct", str(random_pct), "--layout", layout], capture_output=True, text=True)
    if done.returncode:
        raise BenchError(f"bench-app --fill-file {path} failed: {done.stderr.strip()}")


@dataclass
class Stats:
    pid: int
    iters: int
    now_ns: int
    work_us: int
    mem_mib: int
    max_gap_ns: int
    typ_gap_ns: int
    stalls: list[tuple[int, int]] = field(default_factory=list)  # (end_ns, gap_ns)

    def stalls_in(self, t0_ns: int, t1_ns: int) -> list[int]:
        """Gaps (ns) of stalls that overlap [t0_ns, t1_ns]."""
        return [gap for end, gap in self.stalls if end >= t0_ns and end - gap <= t1_ns]

    def longest_stall_in(self, t0_ns: int, t1_ns: int) -> float:
        """Longest stall (s) the app saw while the harness acted in [t0, t1]; 0 if none."""
        gaps = self.stalls_in(t0_ns, t1_ns)
        return max(gaps) / 1e9 if gaps else 0.0


def read_stats(path: Path) -> Stats | None:
    try:
        text = path.read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    lines = text.split("\n")
    head: dict[str, int] = {}
    stalls = []
    for line in lines:
        parts = line.split()
        if len(parts) != 2:
            continue
        if parts[0].isdigit():
            stalls.append((int(parts[0]), int(parts[1])))
        elif parts[1].isdigit():
            head[parts[0]] = int(parts[1])
    keys = ("pid", "iters", "now_ns", "work_us", "mem_mib", "max_gap_ns", "typ_gap_ns")
    if not all(k in head for k in keys):
        return None
    return Stats(**{k: head[k] for k in keys}, stalls=stalls)


class App:
    """One bench-app process: `argv` to launch it any way, or start() it as a plain
    session leader (what raw CRIU needs: no -j)."""

    def __init__(self, mem_mib: int, stats: Path, *, random_pct: int = 50, layout: str = "interleaved",
                 work_us: int = 1000) -> None:
        self.mem_mib = mem_mib
        self.stats_path = Path(stats)
        self.argv = [str(build()), "--mem-mib", str(mem_mib), "--random-pct", str(random_pct),
                     "--layout", layout, "--work-us", str(work_us), "--stats", str(self.stats_path)]
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None  # host PID of the tree's root (changes on a raw restore)

    def start(self, timeout: float = 120.0) -> App:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.proc.pid
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 120.0, exited: Callable[[], int | None] | None = None) -> Stats:
        """Until the app has filled its memory and iterates (stats show iterations).
        exited: returns the app's exit code once it has ended (default: our child's)."""
        if exited is None and self.proc is not None:
            exited = self.proc.poll
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = read_stats(self.stats_path)
            if stats and stats.iters > 50:
                return stats
            rc = exited() if exited else None
            if rc is not None:
                raise BenchError(f"bench-app exited with {rc} before it was ready")
            time.sleep(0.05)
        raise BenchError(f"bench-app ({self.mem_mib} MiB) not ready after {timeout:g} s")

    def stats(self) -> Stats:
        stats = read_stats(self.stats_path)
        if stats is None:
            raise BenchError(f"cannot read the app's stats in {self.stats_path}")
        return stats

    def advancing(self, wait: float = 0.3) -> bool:
        """Whether the app still iterates (its counter moves within `wait` seconds)."""
        before = self.stats().iters
        time.sleep(wait)
        return self.stats().iters > before

    def stop(self) -> None:
        """Kill the app (its session) and reap it if it is our child."""
        pid, self.pid = self.pid, None
        if pid is None:
            return
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(pid, signal.SIGKILL)
        if self.proc is not None and self.proc.pid == pid:
            self.proc.wait(timeout=30)
        else:
            reap(pid)
        self.proc = None


def reap(pid: int, timeout: float = 30.0) -> None:
    """Wait for a child that subprocess did not start (a tree restored as our sibling)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.02)
