"""How fast can an extract fill one fresh tmpfs file? The floor under `slurm-mm restore`'s
extract of CRIU's pages file (nearly all of a job's memory, one file).

Each way writes the same bytes (already in memory) into a new file under --dir and is timed
from open to the last byte; the file is removed between ways:
  dd        one thread, `dd if=/dev/zero bs=8M` (what a shell would do);
  pwrite    T threads pwrite 8 MiB pieces into the one file (what extract does today: every
            write takes the file's inode lock, so page allocation is serialized);
  fallocate fallocate the whole file first, then T threads pwrite (allocation done once);
  mmap      ftruncate, map the file shared, T threads copy into the mapping (page faults
            of a shared tmpfs mapping take no inode lock);
  populate  mmap, each thread first faults its piece in at once (MADV_POPULATE_WRITE);
  files     T threads each fill a file of their own (no shared lock at all: the ceiling).
Prints seconds and GB/s per way.  python3 benchmarks/tmpfs_write_floor.py --gib 8 --threads 16
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PIECE = 8 << 20


def _pieces(total: int) -> list[tuple[int, int]]:
    return [(off, min(PIECE, total - off)) for off in range(0, total, PIECE)]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def way_dd(path: Path, total: int, threads: int, src: bytes) -> float:
    count = total // PIECE
    return _timed(lambda: subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=8M", f"count={count}",
                                          "status=none"], check=True))


def way_pwrite(path: Path, total: int, threads: int, src: bytes, preallocate: bool = False) -> float:
    def run() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if preallocate:
                os.posix_fallocate(fd, 0, total)
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda p: os.pwrite(fd, memoryview(src)[:p[1]], p[0]), _pieces(total)))
        finally:
            os.close(fd)
    return _timed(run)


def way_fallocate(path: Path, total: int, threads: int, src: bytes) -> float:
    return way_pwrite(path, total, threads, src, preallocate=True)


MADV_POPULATE_WRITE = 23  # Linux 5.14: fault a range in at once, writable


def way_mmap(path: Path, total: int, threads: int, src: bytes, populate: bool = False) -> float:
    def copy(m: mmap.mmap, base: int, src_addr: int, piece: tuple[int, int]) -> None:
        if populate:
            m.madvise(MADV_POPULATE_WRITE, piece[0], piece[1])
        ctypes.memmove(base + piece[0], src_addr, piece[1])

    def run() -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, total)
            m = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            base = ctypes.addressof(ctypes.c_char.from_buffer(m))
            src_addr = ctypes.cast(ctypes.c_char_p(src), ctypes.c_void_p).value
            with ThreadPoolExecutor(threads) as pool:  # ctypes calls release the GIL
                list(pool.map(lambda p: copy(m, base, src_addr, p), _pieces(total)))
            m.close()
        finally:
            os.close(fd)
    return _timed(run)


def way_populate(path: Path, total: int, threads: int, src: bytes) -> float:
    return way_mmap(path, total, threads, src, populate=True)


def way_files(path: Path, total: int, threads: int, src: bytes) -> float:
    share = total // threads

    def one(i: int) -> None:
        fd = os.open(f"{path}.{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for off, length in _pieces(share):
                os.pwrite(fd, memoryview(src)[:length], off)
        finally:
            os.close(fd)
    return _timed(lambda: list(ThreadPoolExecutor(threads).map(one, range(threads))))


WAYS = {"dd": way_dd, "pwrite": way_pwrite, "fallocate": way_fallocate, "mmap": way_mmap, "populate": way_populate,
        "files": way_files}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dir", type=Path, default=Path("/dev/shm"))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--ways", default=",".join(WAYS))
    args = ap.parse_args()
    total = int(args.gib * (1 << 30)) // PIECE * PIECE
    src = os.urandom(PIECE)
    path = args.dir / f"slurm_mm-tmpfs-floor.{os.getpid()}"
    print(f"tmpfs write floor: {total / 1e9:.2f} GB into {args.dir}, {args.threads} threads, "
          f"{os.cpu_count()} CPUs, THP {Path('/sys/kernel/mm/transparent_hugepage/shmem_enabled').read_text().strip()}")
    for rep in range(args.reps):
        for name in args.ways.split(","):
            try:
                seconds = WAYS[name](path, total, args.threads, src)
            finally:
                for p in [path, *(Path(f"{path}.{i}") for i in range(args.threads))]:
                    p.unlink(missing_ok=True)
            print(f"rep {rep} {name:9s} {seconds:6.2f} s  {total / seconds / 1e9:5.2f} GB/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
