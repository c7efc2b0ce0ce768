"""The image store against the raw tools, on the same bytes and filesystem, in one run.

    python3 benchmarks/store_bench.py --gib 4 --content criu,random --out results.json

as root (it drops the page cache between steps: "cold" means after
`echo 3 > /proc/sys/vm/drop_caches`). Per content kind it writes a source file of --gib
GiB into --staging (tmpfs: where the engine dumps), then takes turns:
  dd      `dd if=SRC of=SHARED/dd.out bs=4M conv=fsync` (the disk's write speed)
  commit  ImageStore.commit() of the same file (chunks, zstd or raw, hash, write, sync,
          read back), wall time and the CPU seconds of the whole process (all threads)
  cat     cold `cat` of the stored image file (the disk's read speed)
  sha     cold `sha256sum` of the stored image file (one core hashing, the old store's way)
  verify  cold ImageStore.verify()
  extract cold ImageStore.extract() into staging
Ratios: commit vs dd of the stored bytes (goal >= 0.9x), verify and extract vs cold cat of
the stored bytes (goal >= 0.8x); CPU seconds per GB stored beside each (goal: commit +
verify <= 1). --job-threads N also runs N CPU-bound busy threads (a job) during a
periodic (idle-priority) and a preempt (normal) commit and reports the job's slowdown.
Only the Python packages slurm_mm needs; no CRIU, no Slurm.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from slurm_mm.store import ImageStore, pipeline  # noqa: E402

GB = 1e9
BLOCK = 2 << 20


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def child_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def make_source(path: Path, gib: float, content: str) -> int:
    """random: incompressible (GPU state, weights). criu: like a CRIU pages file of the
    benchmark workload: alternating 2 MiB blocks of random bytes and structured int64s."""
    size = int(gib * (1 << 30))
    rng = None
    try:
        import numpy as np  # noqa: PLC0415 - fast random bytes where available
        rng = np.random.default_rng(1)
    except ImportError:
        np = None
    with open(path, "wb") as f:
        done = 0
        i = 0
        while done < size:
            n = min(BLOCK, size - done)
            if content == "criu" and i % 2:
                if np is not None:
                    block = (np.arange(n // 8, dtype=np.int64) * 24 + rng.integers(0, 256, n // 8)).tobytes()
                else:
                    block = b"".join((k * 24 + (k * 7919) % 256).to_bytes(8, "little") for k in range(n // 8))
                block = block[:n].ljust(n, b"\0")
            else:
                block = rng.bytes(n) if rng is not None else os.urandom(n)
            f.write(block)
            done += n
            i += 1
    return size


def run_tool(argv: list[str]) -> tuple[float, float]:
    before = child_cpu_seconds()
    t0 = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t0, child_cpu_seconds() - before


def timed(fn) -> tuple[float, float, object]:
    c0, t0 = cpu_seconds(), time.monotonic()
    result = fn()
    return time.monotonic() - t0, cpu_seconds() - c0, result


def _busy(stop, counter) -> None:
    x = 0
    n = 0
    while not stop.is_set():
        for _ in range(20000):
            x = (x * 1103515245 + 12345) & 0xFFFFFFFF
        n += 1
        if n % 16 == 0:
            with counter.get_lock():
                counter.value += 16


def job_rate(threads: int, seconds: float, during=None, max_window: float = 30.0) -> tuple[float, float]:
    """Iterations per second of `threads` busy processes (a CPU-bound job) over `seconds`,
    or while `during()` runs in a thread (at most max_window seconds: an idle-priority
    commit under a job that takes every core is starved on purpose); (rate, seconds)."""
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    counter = ctx.Value("q", 0)
    procs = [ctx.Process(target=_busy, args=(stop, counter)) for _ in range(threads)]
    for p in procs:
        p.start()
    time.sleep(1.0)  # warm up
    start_n, t0 = counter.value, time.monotonic()
    worker = None
    if during is None:
        time.sleep(seconds)
    else:
        worker = threading.Thread(target=during)
        worker.start()
        worker.join(max_window)
    elapsed = time.monotonic() - t0
    n = counter.value - start_n
    stop.set()
    for p in procs:
        p.join()
    if worker is not None:
        worker.join()
    return n / elapsed, elapsed


def _busy_pinned(stop, counter, cpu) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    _busy(stop, counter)


def slowdown_series(threads: int, commits: dict, reps: int, job_cpu: int | None,
                    alone_s: float = 4.0, max_window: float = 60.0) -> dict:
    """A CPU-bound job (`threads` busy processes, bound to `job_cpu` if given, as Slurm
    binds a job to the CPUs it allocated) runs through `reps` rounds; each round runs every
    entry of `commits` (name -> fn(job_pids) -> cpus it was pinned to or None) once, in
    turn, each after a window of alone_s with the job alone. The job stays up throughout,
    so every window compares the same processes. Slowdown = 1 - rate during the commit /
    mean rate of the windows alone before and after it; the spread of the alone windows
    themselves is the noise floor."""
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    counter = ctx.Value("q", 0)
    procs = [ctx.Process(target=_busy_pinned, args=(stop, counter, job_cpu)) for _ in range(threads)]
    for p in procs:
        p.start()
    pids = [p.pid for p in procs]

    steal: list[float] = []  # share of the job's CPU the hypervisor took, per window

    def cpu_steal() -> float:
        name = f"cpu{job_cpu}" if job_cpu is not None else "cpu"
        for line in Path("/proc/stat").read_text().splitlines():
            f = line.split()
            if f[0] == name and len(f) > 8:
                return int(f[8]) / os.sysconf("SC_CLK_TCK")
        return 0.0

    def window(during=None) -> tuple[float, float, object]:
        s0 = cpu_steal()
        n0, t0 = counter.value, time.monotonic()
        out: dict = {}
        if during is None:
            time.sleep(alone_s)
        else:
            th = threading.Thread(target=lambda: out.setdefault("r", during(pids)))
            th.start()
            th.join(max_window)
        t = time.monotonic() - t0
        rate = (counter.value - n0) / t
        steal.append((cpu_steal() - s0) / t)
        if during is not None:
            th.join()
        return rate, t, out.get("r")

    per: dict = {name: {"during": [], "before": [], "after": [], "commit_s": [], "cpus": None} for name in commits}
    alone: list[float] = []
    try:
        time.sleep(1.0)  # warm up
        last = window()[0]
        alone.append(last)
        for _ in range(reps):
            for name, fn in commits.items():
                rate, t, cpus = window(fn)
                after = window()[0]
                alone.append(after)
                d = per[name]
                d["during"].append(rate)
                d["before"].append(last)
                d["after"].append(after)
                d["commit_s"].append(t)
                d["cpus"] = sorted(cpus) if cpus else None
                last = after
    finally:
        stop.set()
        for p in procs:
            p.join()

    def stats(xs: list[float]) -> dict:
        m = sum(xs) / len(xs)
        sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
        half = 2.0 * sd / len(xs) ** 0.5 if len(xs) > 1 else 0.0  # ~95% (t, n >= 10)
        return {"mean": m, "sd": sd, "min": min(xs), "max": max(xs), "n": len(xs),
                "ci95": [m - half, m + half]}

    result: dict = {"alone_to_alone": stats([1 - b / a for a, b in zip(alone, alone[1:])]),
                    "alone_rates": alone, "job_cpu_steal": steal, "kinds": {}}
    for name, d in per.items():
        slow = [1 - r / ((a + b) / 2) for r, a, b in zip(d["during"], d["before"], d["after"])]
        result["kinds"][name] = {"slowdown": stats(slow), "samples": slow, "commit_s": stats(d["commit_s"]),
                                 "during_rates": d["during"], "commit_cpus": d["cpus"]}
    return result


def placed_commit(args, store: ImageStore, src_dir: Path, kind: str):
    """One way of doing the commit beside the job, as fn(job_pids) -> CPUs it was put on:
    raw      `dd bs=4M conv=fsync` of the source to the store's disk (the raw tool; normal
             priority, anywhere)
    any      a periodic commit, idle priority, wherever the scheduler puts its threads
             (the store before it was given CPUs)
    spare    a periodic commit on the CPUs the agent picks (agent/commit_cpus.py, from the
             job's processes, exactly as the supervisor calls it)
    hand     a periodic commit pinned by hand to every CPU but the first
    preempt  a stopping commit: normal priority, anywhere (its time is what GraceTime needs)"""
    from slurm_mm.agent import commit_cpus  # noqa: PLC0415

    def fn(pids: list[int]):
        cpus = None
        if kind == "raw":
            out = args.shared / "dd.out"
            run_tool(["dd", f"if={src_dir / 'pages-1.img'}", f"of={out}", "bs=4M", "conv=fsync"])
            os.unlink(out)
            return None
        if kind == "spare":
            cpus = commit_cpus.spare_cpus(pids)
        elif kind == "hand":
            cpus = frozenset(sorted(os.sched_getaffinity(0))[1:])
            os.sched_setaffinity(0, cpus)  # this thread; the store's threads inherit it
        trigger = "preempt" if kind == "preempt" else "periodic"
        store.commit("bench", src_dir, epoch=0, uid=0, gid=0, node=platform.node(), trigger=trigger,
                     cpus=cpus if kind == "spare" else None)
        store.remove_job("bench")
        return cpus
    return fn


def one_round(args, content: str, src_dir: Path, size: int, read_back: str, rep: int, full: bool) -> dict:
    """dd and commit of the same bytes; with `full` also cold cat, sha256sum, verify and
    extract of the stored image."""
    staging, shared = args.staging, args.shared
    store = ImageStore(shared / "store", level=args.level, threads=args.threads, keep=1,
                       chunk_size=args.chunk_mib << 20, read_back=read_back)
    row: dict = {"content": content, "rep": rep, "raw_bytes": size, "read_back": read_back}
    dd_out = shared / "dd.out"
    drop_caches()
    row["dd_s"], row["dd_cpu"] = run_tool(["dd", f"if={src_dir / 'pages-1.img'}", f"of={dd_out}", "bs=4M",
                                           "conv=fsync"])
    os.unlink(dd_out)
    drop_caches()
    row["commit_s"], row["commit_cpu"], image = timed(lambda: store.commit(
        "bench", src_dir, epoch=0, uid=0, gid=0, node=platform.node(), trigger="preempt"))
    pages = next(f for f in image.manifest.files if f.name == "pages-1.img")
    stored = image.path / pages.stored_name
    row["stored_bytes"] = image.manifest.stored_size
    row["packed_chunks"] = sum(c.stored_size < pages.raw_length(i) for i, c in enumerate(pages.chunks))
    row["chunks"] = len(pages.chunks)
    sgb = row["stored_bytes"] / GB
    if abs(row["stored_bytes"] - size) > 0.02 * size:  # dd exactly the stored bytes for the ratio
        drop_caches()
        row["dd_stored_s"], _ = run_tool(["dd", f"if={stored}", f"of={dd_out}", "bs=4M", "conv=fsync"])
        os.unlink(dd_out)
    else:
        row["dd_stored_s"] = row["dd_s"] * row["stored_bytes"] / size
    row.update({"commit_MBps": row["stored_bytes"] / row["commit_s"] / 1e6,
                "dd_MBps": row["stored_bytes"] / row["dd_stored_s"] / 1e6,
                "commit_vs_dd": row["dd_stored_s"] / row["commit_s"],
                "commit_cpu_per_gb": row["commit_cpu"] / sgb, "dd_cpu_per_gb": row["dd_cpu"] / (size / GB)})
    if full:
        drop_caches()
        row["cat_s"], row["cat_cpu"] = run_tool(["cat", str(stored)])
        if not args.no_sha:
            drop_caches()
            row["sha256sum_s"], row["sha256sum_cpu"] = run_tool(["sha256sum", str(stored)])
        drop_caches()
        row["verify_s"], row["verify_cpu"], _ = timed(lambda: store.verify(image))
        dest = staging / "extracted"
        shutil.rmtree(dest, ignore_errors=True)
        drop_caches()
        row["extract_s"], row["extract_cpu"], _ = timed(lambda: store.extract(image, dest))
        assert (dest / "pages-1.img").stat().st_size == size
        shutil.rmtree(dest)
        # the extract's own floor here: writing the raw bytes into fresh tmpfs
        fill = staging / "fill"
        row["tmpfs_fill_s"], _ = run_tool(["dd", "if=/dev/zero", f"of={fill}", "bs=4M",
                                           f"count={-(-size // (4 << 20))}"])
        os.unlink(fill)
        for threads, io in ((t, io) for t in args.read_threads for io in args.read_io):
            variant = ImageStore(shared / "store", level=args.level, threads=threads, keep=1,
                                 chunk_size=args.chunk_mib << 20, read_back=read_back)
            real, real_seq, real_readers = pipeline.set_direct, pipeline.SEQUENTIAL_READS, pipeline.READERS
            kind = io.rstrip("0123456789")
            pipeline.SEQUENTIAL_READS = kind in ("seq", "seqbuf")  # else each worker reads its chunk
            if io != kind:  # seq4: four reader threads
                pipeline.READERS = int(io[len(kind):])
            if kind in ("buffered", "seqbuf"):
                pipeline.set_direct = lambda fd, on: (not on) and real(fd, on)
            try:
                drop_caches()
                vs, vc, _ = timed(lambda: variant.verify(image))
                drop_caches()
                es, ec, _ = timed(lambda: variant.extract(image, dest))
            finally:
                pipeline.set_direct, pipeline.SEQUENTIAL_READS, pipeline.READERS = real, real_seq, real_readers
            shutil.rmtree(dest)
            row.setdefault("read_variants", []).append(
                {"threads": threads, "io": io, "verify_s": vs, "verify_cpu": vc, "extract_s": es,
                 "extract_cpu": ec, "verify_vs_cat": row["cat_s"] / vs, "extract_vs_cat": row["cat_s"] / es})
        row.update({"verify_vs_cat": row["cat_s"] / row["verify_s"],
                    "extract_vs_cat": row["cat_s"] / row["extract_s"],
                    "verify_cpu_per_gb": row["verify_cpu"] / sgb,
                    "extract_cpu_per_gb": row["extract_cpu"] / sgb,
                    "commit_plus_verify_cpu_per_gb": (row["commit_cpu"] + row["verify_cpu"]) / sgb})
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    store.remove_job("bench")
    return row


def bench_content(args, content: str, results: dict) -> None:
    staging, shared = args.staging, args.shared
    src_dir = staging / f"src-{content}"
    shutil.rmtree(src_dir, ignore_errors=True)
    src_dir.mkdir(mode=0o700)
    size = make_source(src_dir / "pages-1.img", args.gib, content)
    (src_dir / "core-1.img").write_bytes(b"registers and such " * 4000)
    rows = []
    for rep in range(0 if args.skip_io else args.reps):
        for n, read_back in enumerate(args.read_back):
            rows.append(one_round(args, content, src_dir, size, read_back, rep, full=n == 0))
    for threads in args.job_threads if args.pin else []:
        store = ImageStore(shared / "store", level=args.level, threads=args.threads, keep=1,
                           chunk_size=args.chunk_mib << 20, read_back=args.job_read_back,
                           background_cpus=args.background_cpus)
        cpus = sorted(os.sched_getaffinity(0))
        job_cpu = None if args.job_unbound else cpus[0]
        commits = {kind: placed_commit(args, store, src_dir, kind) for kind in args.job_kinds}
        series = slowdown_series(threads, commits, args.job_reps, job_cpu)
        row = {"content": content, "job_threads": threads, "job_cpu": job_cpu, "read_back": args.job_read_back,
               "background_cpus": args.background_cpus, **series}
        print(json.dumps({k: v for k, v in row.items() if k not in ("alone_rates", "job_cpu_steal")}), flush=True)
        for kind, d in series["kinds"].items():
            sd = d["slowdown"]
            print(f"{content} job x{threads} {kind:8s} slowed {sd['mean']:+.1%} (sd {sd['sd']:.1%}, 95% "
                  f"{sd['ci95'][0]:+.1%}..{sd['ci95'][1]:+.1%}, n={sd['n']}) commit {d['commit_s']['mean']:.2f} s "
                  f"cpus {d['commit_cpus']}", flush=True)
        results.setdefault("job", []).append(row)
    for threads in args.job_threads if not args.pin else []:
        store = ImageStore(shared / "store", level=args.level, threads=args.threads, keep=1,
                           chunk_size=args.chunk_mib << 20, read_back=args.read_back[0],
                           background_cpus=args.background_cpus)
        base_rate, _ = job_rate(threads, 10)
        for trigger in [t for _ in range(args.job_reps) for t in args.job_triggers]:
            commit_time = {}

            def commit() -> None:
                t0 = time.monotonic()
                store.commit("bench", src_dir, epoch=0, uid=0, gid=0, node=platform.node(), trigger=trigger)
                commit_time["s"] = time.monotonic() - t0

            rate, window = job_rate(threads, 0, during=commit)
            after, _ = job_rate(threads, 10)
            ref = (base_rate + after) / 2
            row = {"content": content, "job_threads": threads, "trigger": trigger,
                   "background_cpus": args.background_cpus,
                   "job_rate_alone": ref, "job_rate_during_commit": rate, "slowdown": 1 - rate / ref,
                   "commit_s": commit_time["s"], "window_s": window, "rate_before": base_rate,
                   "rate_after": after}
            print(json.dumps(row), flush=True)
            results.setdefault("job", []).append(row)
            store.remove_job("bench")
            base_rate = after
    shutil.rmtree(src_dir, ignore_errors=True)
    results.setdefault("rows", []).extend(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--content", default="criu,random")
    ap.add_argument("--staging", type=Path, default=Path("/dev/shm/slurm_mm-store-bench"))
    ap.add_argument("--shared", type=Path, default=Path("/var/tmp/slurm_mm-store-bench"))
    ap.add_argument("--level", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--chunk-mib", type=int, default=8)
    ap.add_argument("--read-back", default="cache", help="cache, device or cache,device (the first also verifies and extracts)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--job-threads", default="", help="e.g. 1,2: CPU-bound job processes during a commit")
    ap.add_argument("--background-cpus", type=float, default=None,
                    help="ImageStore background_cpus for the periodic commit of --job-threads")
    ap.add_argument("--skip-io", action="store_true", help="only the --job-threads part")
    ap.add_argument("--job-reps", type=int, default=1)
    ap.add_argument("--job-triggers", default="periodic,preempt", help="without --pin: the commits beside the job")
    ap.add_argument("--pin", action="store_true",
                    help="job bound to the first CPU, --job-reps rounds of each --job-kinds, mean and spread")
    ap.add_argument("--job-kinds", default="raw,any,spare,preempt", help="with --pin: see placed_commit()")
    ap.add_argument("--job-read-back", default="auto", help="with --pin: the store's read_back")
    ap.add_argument("--job-unbound", action="store_true", help="with --pin: leave the job unbound")
    ap.add_argument("--no-sha", action="store_true", help="skip the cold sha256sum (the old store's reference)")
    ap.add_argument("--read-threads", default="", help="e.g. 2,4,8: also verify and extract with these threads")
    ap.add_argument("--read-io", default="direct", help="with --read-threads: seq (spans read in order),"
                    " direct (each worker reads its chunk, the default), buffered, seqbuf (seq through the page cache);"
                    " seqN/seqbufN: with N reader threads")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("store_bench: run as root (it drops the page cache)", file=sys.stderr)
        return 2
    args.read_back = args.read_back.split(",")
    args.job_threads = [int(x) for x in args.job_threads.split(",") if x]
    args.job_triggers = args.job_triggers.split(",")
    args.job_kinds = args.job_kinds.split(",")
    args.read_threads = [int(x) for x in args.read_threads.split(",") if x]
    args.read_io = args.read_io.split(",")
    for d in (args.staging, args.shared):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True, mode=0o711)
    results: dict = {"machine": {"uname": " ".join(platform.uname()), "cpus": os.cpu_count(),
                                 "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                                 "thp": Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()},
                     "settings": {k: str(v) for k, v in vars(args).items()}}
    try:
        for content in args.content.split(","):
            bench_content(args, content, results)
            if args.out:
                args.out.write_text(json.dumps(results, indent=1))
    finally:
        for d in (args.staging, args.shared):
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
