#!/opt/slurm_mm/venv/bin/python
"""slurm_mm against the raw tools, on the same workload in the same run (issue 5).

    sudo /opt/slurm_mm/venv/bin/python benchmarks/run_benchmarks.py [--bench store,freeze,...]
        [--quick] [--sizes-mib 1024,2048,4096,6144] [--out benchmarks/out/results.json]

Benchmarks (each prints figures with the raw-tool figure beside them and the ratio):
  store     image store commit/extract vs `dd` on the same bytes and filesystem;
            zstd ratio and speed at levels 1, 3, 9, 19 (goal: commit >= 0.9x dd)
  freeze    what the app feels of one periodic checkpoint: slurm_mm's async checkpoint
            (dump to node-local staging, the job resumes, commit in background) vs the
            serial one (dump straight to the shared dir, commit, then resume)  (<= 0.5x)
  overhead  slurm_mm checkpoint/restore vs raw `criu dump`/`criu restore`     (<= 1.15x)
  periodic  the app's iterations/s with and without checkpoints at a short interval,
            scaled to a 30-minute interval and a 16 GB job                     (< 1%)
  scaling   freeze and commit vs image size; 1, 2, 4 jobs checkpointing at once

The workload is benchmarks/workload.c (built on first use): a compute loop over N MiB of
memory, half random and half structured bytes, that logs its own stalls and iterations.
The "shared filesystem" is a local directory (--shared; default on the root disk): on a
real cluster point it at the parallel filesystem. Staging is --staging (default tmpfs).
Needs root (CRIU). Memory use is bounded by --mem-budget-gib (default 16).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(HERE), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

import zstandard  # noqa: E402

import app as app_mod  # noqa: E402
import raw  # noqa: E402
from app import App, BenchError  # noqa: E402
from report import Figure, machine, median, table, write_json  # noqa: E402
from slurm_mm.store import ImageStore, image_store  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
JOB = "bench"
OWNER = (65534, 65534)  # nobody:nogroup own the benchmark images
STORE_LEVEL = 3  # the store's default level
LEVELS = (1, 3, 9, 19)


def log(*parts: object) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


class Run:
    """One benchmark run: its settings, scratch directories, memory budget and results."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.shared: Path = args.shared
        self.staging: Path = args.staging
        self.repeat: int = args.repeat
        self.figures: list[Figure] = []
        self.details: dict[str, object] = {}
        self.budget = int(args.mem_budget_gib * GiB)

    def setup(self) -> None:
        for d in (self.shared, self.staging):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o755)

    def cleanup(self) -> None:
        for d in (self.shared, self.staging):
            shutil.rmtree(d, ignore_errors=True)

    def scratch(self, where: Path, name: str) -> Path:
        """A fresh, empty directory `name` under `where` (removed first if left over)."""
        path = where / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def need(self, nbytes: int, what: str) -> None:
        """Refuse a step whose memory (app RAM + tmpfs staging) would break the budget or
        leave the machine short: other people's work runs here too."""
        staged = _tmpfs_bytes(self.staging)
        if staged + nbytes > self.budget:
            raise BenchError(f"{what} needs {nbytes / GiB:.1f} GiB beside {staged / GiB:.1f} GiB staged: "
                             f"over the {self.budget / GiB:g} GiB budget (--mem-budget-gib)")
        avail = _mem_available()
        if avail - nbytes < 2 * GiB:
            raise BenchError(f"{what} needs {nbytes / GiB:.1f} GiB; only {avail / GiB:.1f} GiB available")

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        ratio = "" if figure.ratio is None else f" ratio {figure.ratio:.2f}"
        log(f"  {figure.bench}: {figure.name} = {figure.value:.4g} {figure.unit}{ratio}")
        return figure


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _tmpfs_bytes(path: Path) -> int:
    """Bytes held under `path` if it is on tmpfs (they are RAM), else 0."""
    if os.statvfs(path).f_blocks and Path("/proc/mounts").exists():
        best = ""
        fstype = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
        if fstype != "tmpfs":
            return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6 if seconds > 0 else float("nan")


# ----------------------------------------------------------------------------- images

def criu_image(run: Run, mib: int, name: str, *, layout: str = "interleaved", random_pct: int = 50) -> Path:
    """A real CRIU image (raw `criu dump`) of bench-app with `mib` MiB of memory, in staging."""
    run.need(2 * mib * MiB, f"a {mib} MiB CRIU image")
    work = run.scratch(run.staging, name)
    images = work / "img"
    a = App(mib, work / "stats", random_pct=random_pct, layout=layout).start()
    try:
        raw.criu_dump(a.pid, images, work / "log")
    finally:
        a.stop()
    return images


def random_image(run: Run, mib: int, name: str) -> Path:
    """An incompressible "image": one file of random bytes (like GPU memory of floats)."""
    run.need(mib * MiB, f"a {mib} MiB random file")
    work = run.scratch(run.staging, name)
    images = work / "img"
    images.mkdir()
    app_mod.fill_file(images / "pages-1.img", mib, 100)
    return images


class PhaseClock:
    """Times the store's commit phases through its test-only hook (measurement only)."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []

    def __enter__(self) -> PhaseClock:
        self.marks = [("start", time.monotonic())]
        image_store.phase_hook = lambda name: self.marks.append((name, time.monotonic()))
        return self

    def __exit__(self, *exc: object) -> None:
        image_store.phase_hook = None

    def split(self) -> dict[str, float]:
        """Seconds per stage: write (read+hash+compress+write every file), sync (manifest,
        fsync), verify (read back, decompress, hash), finish (rename, retention)."""
        t = {}
        for name, at in self.marks:
            t[name] = at  # "file-written" keeps its last mark
        get = lambda k: t.get(k, t["start"])  # noqa: E731
        return {"write": get("file-written") - get("tmp-created"),
                "sync": get("synced") - get("file-written"),
                "verify": get("verified") - get("synced"),
                "finish": get("collected") - get("verified"),
                "total": self.marks[-1][1] - t["start"]}


def commit_once(run: Run, source: Path, level: int) -> tuple[float, dict, object]:
    store = ImageStore(run.shared / "store", level=level, threads=0, keep=1)
    store.remove_job(JOB)
    store.prepare_job(JOB, *OWNER)
    with PhaseClock() as clock:
        t0 = time.monotonic()
        image = store.commit(JOB, source, epoch=0, uid=OWNER[0], gid=OWNER[1], node=os.uname().nodename,
                             trigger="periodic", criu_version=raw.criu_version())
        elapsed = time.monotonic() - t0
    return elapsed, clock.split(), image


# ----------------------------------------------------------------------------- store

def bench_store(run: Run) -> None:
    """Benchmark 3: commit and extract vs dd on the same bytes; compression levels."""
    levels = sorted({1, STORE_LEVEL} | set(run.args.commit_levels))
    rows = []
    for mib in run.args.store_sizes_mib:
        log(f"store: {mib} MiB")
        contents = [("criu-image", criu_image(run, mib, f"store-img-{mib}")),
                    ("incompressible", random_image(run, mib, f"store-rand-{mib}"))]
        for content, source in contents:
            rows.append(_store_vs_dd(run, content, source, mib, levels))
        if mib == run.args.store_sizes_mib[0]:
            _levels_table(run, contents)
        for _, source in contents:
            shutil.rmtree(source.parent, ignore_errors=True)
    run.details["store"] = rows
    _store_decision(run)


def _store_vs_dd(run: Run, content: str, source: Path, mib: int, levels: list[int]) -> dict:
    nbytes = raw.size_of(source)
    dd_w, dd_r, ex = [], [], []
    commit: dict[int, list[float]] = {lv: [] for lv in levels}
    phases: dict[int, list[dict]] = {lv: [] for lv in levels}
    stored: dict[int, int] = {}
    compressed: dict[int, list[str]] = {}
    for i in range(run.repeat):
        # dd and the store take turns, so that noise (steal time here) hits both alike.
        copy = run.shared / "dd-copy"
        shutil.rmtree(copy, ignore_errors=True)
        dd_w.append(raw.dd_copy_dir(source, copy))
        raw.evict(copy)
        back = run.staging / "dd-read"
        shutil.rmtree(back, ignore_errors=True)
        run.need(nbytes, "reading the image back")
        dd_r.append(raw.dd_copy_dir(copy, back, fsync=False))
        shutil.rmtree(back)
        shutil.rmtree(copy)
        for lv in levels:
            elapsed, split, image = commit_once(run, source, lv)
            commit[lv].append(elapsed)
            phases[lv].append(split)
            stored[lv] = sum(f.stored_size for f in image.manifest.files)
            compressed[lv] = [f.name for f in image.manifest.files if f.compressed]
            if lv == STORE_LEVEL:
                raw.evict(image.path)
                dest = run.staging / "extract"
                shutil.rmtree(dest, ignore_errors=True)
                store = ImageStore(run.shared / "store", level=lv, threads=0, keep=1)
                t0 = time.monotonic()
                store.extract(image, dest)
                ex.append(time.monotonic() - t0)
                shutil.rmtree(dest)
        ImageStore(run.shared / "store").remove_job(JOB)
    label = f"{content} {mib} MiB"
    dd_mbps = [mbps(nbytes, t) for t in dd_w]
    for lv in levels:
        split = {k: median([p[k] for p in phases[lv]]) for k in phases[lv][0]}
        ratio = nbytes / stored[lv]
        run.add(Figure("store", f"commit {label}, zstd {lv}", median([mbps(nbytes, t) for t in commit[lv]]), "MB/s",
                       baseline=median(dd_mbps), baseline_name="dd conv=fsync", goal=(">=", 0.9),
                       samples=[mbps(nbytes, t) for t in commit[lv]], baseline_samples=dd_mbps,
                       note=(f"stored {ratio:.2f}x smaller; compressed: {', '.join(compressed[lv]) or 'none'}; "
                             "stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in split.items()))))
    run.add(Figure("store", f"extract {label} (cold cache)", median([mbps(nbytes, t) for t in ex]), "MB/s",
                   baseline=median([mbps(nbytes, t) for t in dd_r]), baseline_name="dd read",
                   samples=[mbps(nbytes, t) for t in ex], baseline_samples=[mbps(nbytes, t) for t in dd_r]))
    return {"content": content, "mib": mib, "bytes": nbytes, "dd_write_s": dd_w, "dd_read_s": dd_r,
            "commit_s": {str(k): v for k, v in commit.items()}, "extract_s": ex,
            "stored_bytes": {str(k): v for k, v in stored.items()},
            "phases": {str(k): v for k, v in phases.items()}}


def _sample(path: Path, nbytes: int, pieces: int = 16) -> bytes:
    """`nbytes` of a file in `pieces` evenly spaced slices, so both halves of the memory
    (and the file's start, middle and end) are represented."""
    size = path.stat().st_size
    if size <= nbytes:
        return path.read_bytes()
    piece = nbytes // pieces
    out = bytearray()
    with path.open("rb") as f:
        for i in range(pieces):
            f.seek((size - piece) * i // (pieces - 1))
            out += f.read(piece)
    return bytes(out)


def _levels_table(run: Run, contents: list[tuple[str, Path]]) -> None:
    """zstd ratio and speed at the levels the store offers, as the store calls it
    (threads = one per CPU, checksummed frames), on a sample of each content."""
    table_rows = []
    for content, source in contents:
        pages = max(raw.files(source), key=lambda p: p.stat().st_size)
        data = _sample(pages, run.args.level_sample_mib * MiB)
        for lv in LEVELS:
            cctx = zstandard.ZstdCompressor(level=lv, threads=-1, write_checksum=True)
            t0 = time.monotonic()
            packed = cctx.compress(data)
            c_s = time.monotonic() - t0
            t0 = time.monotonic()
            zstandard.ZstdDecompressor().decompress(packed, max_output_size=len(data))
            d_s = time.monotonic() - t0
            row = {"content": content, "level": lv, "sample_bytes": len(data), "ratio": len(data) / len(packed),
                   "compress_mbps": mbps(len(data), c_s), "decompress_mbps": mbps(len(data), d_s)}
            table_rows.append(row)
            run.add(Figure("store", f"zstd {lv} on {content} ({len(data) // MiB} MiB sample)",
                           row["compress_mbps"], "MB/s",
                           note=f"ratio {row['ratio']:.2f}x, decompress {row['decompress_mbps']:.0f} MB/s"))
    run.details["levels"] = table_rows


def _store_decision(run: Run) -> None:
    """The store compresses a file only if a 1 MiB sample of its START shrinks by 10%. A
    CRIU pages file holds all memory in address order, the program's own pages first:
    show what that decides for a few memory layouts, against what zstd could do."""
    mib = run.args.decision_mib
    rows = []
    for label, layout, pct in (("half random, interleaved", "interleaved", 50),
                               ("half random, random first", "split", 50),
                               ("all random (like GPU data)", "interleaved", 100)):
        source = criu_image(run, mib, f"store-decision-{layout}-{pct}", layout=layout, random_pct=pct)
        elapsed, _, image = commit_once(run, source, STORE_LEVEL)
        pages = max(image.manifest.files, key=lambda f: f.size)
        data = _sample(source / pages.name, 64 * MiB)
        could = len(data) / len(zstandard.ZstdCompressor(level=STORE_LEVEL, threads=-1).compress(data))
        head = _head(source / pages.name)
        head_ratio = len(head) / len(zstandard.ZstdCompressor(level=STORE_LEVEL).compress(head))
        rows.append({"memory": label, "file": pages.name, "compressed": pages.compressed,
                     "stored_ratio": pages.size / pages.stored_size, "possible_ratio": could,
                     "first_mib_ratio": head_ratio, "commit_mbps": mbps(pages.size, elapsed)})
        run.add(Figure("store", f"pages file, memory {label} ({mib} MiB)", pages.size / pages.stored_size,
                       "x smaller",
                       note=(f"store compressed it: {pages.compressed} (its first MiB packs {head_ratio:.2f}x); "
                             f"zstd {STORE_LEVEL} on the whole file: {could:.2f}x; "
                             f"commit {mbps(pages.size, elapsed):.0f} MB/s")))
        ImageStore(run.shared / "store").remove_job(JOB)
        shutil.rmtree(source.parent, ignore_errors=True)
    run.details["store_decision"] = rows


def _head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(MiB)


# ----------------------------------------------------------------------------- engine

def _engine():
    """The engine-side helpers (jobs.py), imported only when a benchmark needs them."""
    try:
        import jobs
    except ImportError as exc:
        raise BenchError(f"slurm_mm's engine is not importable ({exc}); the store benchmark runs without it")
    return jobs


def bench_freeze(run: Run) -> None:
    """Benchmark 1: what the app feels of one periodic checkpoint, async vs serial."""
    jobs = _engine()
    rows = []
    for mib in run.args.freeze_sizes_mib:
        log(f"freeze: {mib} MiB")
        run.need(2 * mib * MiB, f"a {mib} MiB job and its staged image")
        job = jobs.Job(run.staging, mib, f"freeze-{mib}")
        store = jobs.store_at(run.shared)
        kinds: dict[str, list] = {"async": [], "serial": [], "raw": []}
        try:
            def do_async() -> None:
                base = jobs.rate(job, 1.0)
                ck, thread = jobs.async_checkpoint(job, run.staging, store, JOB,
                                                   commit_idle=run.args.commit_priority[0] == "idle")
                felt_s = jobs.felt(job, ck)
                s0 = job.app.stats()
                thread.join()
                s1 = job.app.stats()
                if ck.error:
                    raise BenchError(f"background commit failed: {ck.error}")
                during = (s1.iters - s0.iters) / max((s1.now_ns - s0.now_ns) / 1e9, 1e-9)
                kinds["async"].append({**_ck_dict(ck), "felt_s": felt_s, "rate_before": base,
                                       "rate_during_commit": during})

            def do_serial() -> None:
                ck = jobs.serial_checkpoint(job, run.shared, store, JOB)
                kinds["serial"].append({**_ck_dict(ck), "felt_s": jobs.felt(job, ck)})

            def do_raw() -> None:
                ck = jobs.raw_dump_to_shared(job, run.shared)
                kinds["raw"].append({**_ck_dict(ck), "felt_s": jobs.felt(job, ck)})

            # The order rotates: on this VM a dump is faster when the memory it fills was
            # touched lately (free page reporting), which would favour whoever goes second.
            order = [do_async, do_serial, do_raw]
            for i in range(run.repeat):
                for step in order[i % 3:] + order[:i % 3]:
                    step()
                    time.sleep(1)
        finally:
            job.stop()
            store.remove_job(JOB)
        felt = {k: [x["felt_s"] for x in v] for k, v in kinds.items()}
        a = kinds["async"]
        slow = median([x["rate_during_commit"] / x["rate_before"] for x in a])
        run.add(Figure("freeze", f"app-felt freeze, {mib} MiB job", median(felt["async"]), "s",
                       baseline=median(felt["serial"]), baseline_name="serial", goal=("<=", 0.5),
                       samples=felt["async"], baseline_samples=felt["serial"],
                       note=(f"async: dump to staging {median([x['dump_s'] for x in a]):.2f} s, then commit in "
                             f"background {median([x['commit_s'] for x in a]):.2f} s while the app ran at "
                             f"{slow:.0%} of its speed; serial: dump to shared "
                             f"{median([x['dump_s'] for x in kinds['serial']]):.2f} s + commit "
                             f"{median([x['commit_s'] for x in kinds['serial']]):.2f} s, app stopped")))
        run.add(Figure("freeze", f"app-felt freeze vs a bare criu dump, {mib} MiB job", median(felt["async"]), "s",
                       baseline=median(felt["raw"]), baseline_name="criu dump -R to shared",
                       samples=felt["async"], baseline_samples=felt["raw"],
                       note="the bare dump leaves no verified image (no checksum, fsync or commit)"))
        rows.append({"mib": mib, **kinds})
    run.details["freeze"] = rows


def _raw_dump(run: Run, job) -> float:
    images = run.staging / "scaling-raw"
    shutil.rmtree(images, ignore_errors=True)
    try:
        return raw.criu_dump(job.init_pid, images, run.staging / "scaling-log", leave="running")
    finally:
        shutil.rmtree(images, ignore_errors=True)


def _parallel_dump_probe(run: Run, jobs) -> None:
    """Two jobs dumped at the same instant, a few times: does CRIU manage? Each dump's
    parasite mkdirs "proc.crtools" in the cwd of the job's PID 1 ("/" for every mm-init
    tree) when that tree's /proc is not its own: two at once collide (EEXIST). Tried with
    the host's /proc (CPU nodes today) and with mm-init --private-proc (GPU nodes)."""
    tries = run.args.probe_tries
    if tries <= 0:
        return
    rows = {}
    for private in (False, True):
        run.need(4 * 64 * MiB, "the parallel dump probe")
        a = jobs.Job(run.staging, 64, "probe-a", private_proc=private)
        b = jobs.Job(run.staging, 64, "probe-b", private_proc=private)
        failures: list[str] = []
        try:
            for _ in range(tries):
                go = threading.Barrier(2)

                def dump(job, name: str) -> None:
                    images = run.staging / f"probe-{name}-img"
                    shutil.rmtree(images, ignore_errors=True)
                    go.wait()
                    try:
                        jobs.checkpoint_tree(job.init_pid, images, leave_running=True, criu=jobs.CRIU)
                    except Exception as exc:  # noqa: BLE001 - the point of the probe
                        failures.append(str(exc)[:200])
                    shutil.rmtree(images, ignore_errors=True)

                ts = [threading.Thread(target=dump, args=(j, n)) for j, n in ((a, "a"), (b, "b"))]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
        finally:
            a.stop()
            b.stop()
        label = "own /proc (--private-proc)" if private else "host /proc"
        rows[label] = {"pairs": tries, "failed_dumps": len(failures), "errors": failures}
        run.add(Figure("scaling", f"2 dumps started together, {label}, {tries} tries: dumps failed",
                       len(failures), f"of {2 * tries}", note=(failures[0] if failures else "none failed")))
    run.details["parallel_dump_probe"] = rows


def _ck_dict(ck) -> dict:
    return {"dump_s": ck.dump_s, "commit_s": ck.commit_s, "blocked_s": ck.blocked_s, "total_s": ck.total_s,
            "image_bytes": ck.image_bytes, "stored_bytes": ck.stored_bytes, "engine": ck.engine_timings}


def bench_overhead(run: Run) -> None:
    """Benchmark 2: slurm_mm checkpoint/restore vs raw criu dump/restore, same tree."""
    jobs = _engine()
    rows = []
    for mib in run.args.overhead_mib:
        rows.append(_overhead_one(run, jobs, mib))
    run.details["overhead"] = rows


def _overhead_one(run: Run, jobs, mib: int) -> dict:
    log(f"overhead: {mib} MiB")
    run.need(3 * mib * MiB, f"a {mib} MiB job and two staged images")
    job = jobs.Job(run.staging, mib, f"overhead-{mib}")
    raw_img, mm_img = run.staging / "overhead-raw", run.staging / "overhead-mm"
    logs = run.staging / "overhead-logs"
    d: dict[str, list[float]] = {"raw": [], "raw_v4": [], "mm": []}
    r_raw, r_mm = [], []

    def dump_raw() -> None:
        shutil.rmtree(raw_img, ignore_errors=True)
        d["raw"].append(raw.criu_dump(job.init_pid, raw_img, logs, leave="running"))

    def dump_raw_v4() -> None:
        img = run.staging / "overhead-raw-v4"
        shutil.rmtree(img, ignore_errors=True)
        d["raw_v4"].append(raw.criu_dump(job.init_pid, img, logs, leave="running", verbosity="-v4"))
        shutil.rmtree(img, ignore_errors=True)

    def dump_mm() -> None:
        shutil.rmtree(mm_img, ignore_errors=True)
        d["mm"].append(_timed(lambda: jobs.checkpoint_tree(job.init_pid, mm_img, leave_running=True,
                                                           criu=jobs.CRIU)))

    try:
        # Rotate the order: on this VM whoever dumps second into freshly freed memory
        # tends to be faster.
        order = [dump_raw, dump_raw_v4, dump_mm]
        for i in range(run.repeat):
            for step in order[i % 3:] + order[:i % 3]:
                step()
                time.sleep(0.5)
        for i in range(run.repeat):
            for which in (("raw", "mm") if i % 2 == 0 else ("mm", "raw")):
                job.stop()
                if which == "raw":
                    pid, t = raw.criu_restore(raw_img, logs)
                    r_raw.append(t)
                    job.adopt(pid=pid)
                else:
                    r_mm.append(jobs.restore_job(job, mm_img))
    finally:
        job.stop()
        for p in (raw_img, mm_img, logs):
            shutil.rmtree(p, ignore_errors=True)
    best = min(d["mm"]) / min(d["raw"])
    run.add(Figure("overhead", f"checkpoint (dump -R to staging), {mib} MiB job", median(d["mm"]), "s",
                   baseline=median(d["raw"]), baseline_name="criu dump", goal=("<=", 1.15),
                   samples=d["mm"], baseline_samples=d["raw"],
                   note=(f"best of {run.repeat}: {best:.2f}x; engine = checkpoint_tree (reads /proc, criu -v4, "
                         "engine.json) vs criu dump, same flags, -v2 (criu -v4 by hand is in the JSON)")))
    run.add(Figure("overhead", f"restore, {mib} MiB job", median(r_mm), "s",
                   baseline=median(r_raw), baseline_name="criu restore", goal=("<=", 1.15),
                   samples=r_mm, baseline_samples=r_raw,
                   note=(f"best of {run.repeat}: {min(r_mm) / min(r_raw):.2f}x; engine.restore_tree with the "
                         "owner check (pre-resume action script) vs criu restore -d --restore-sibling, same flags")))
    return {"mib": mib, "dump_raw_s": d["raw"], "dump_raw_v4_s": d["raw_v4"], "dump_mm_s": d["mm"],
            "restore_raw_s": r_raw, "restore_mm_s": r_mm}


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def bench_periodic(run: Run) -> None:
    """Benchmark 4: the app's throughput with periodic checkpoints vs without."""
    jobs = _engine()
    window, interval = run.args.periodic_seconds, run.args.interval
    rows = []
    for mib in run.args.periodic_sizes_mib:
        for priority in run.args.commit_priority:
            rows.append(_periodic_one(run, jobs, mib, priority, window, interval))
    run.details["periodic"] = rows
    for priority in run.args.commit_priority:
        _extrapolate(run, [r for r in rows if r["commit_priority"] == priority], priority)


def _periodic_one(run: Run, jobs, mib: int, priority: str, window: float, interval: float) -> dict:
    log(f"periodic: {mib} MiB, checkpoint every {interval:g} s for {window:g} s, commit priority {priority}")
    run.need(2 * mib * MiB, f"a {mib} MiB job and its staged image")
    job = jobs.Job(run.staging, mib, f"periodic-{mib}")
    store = jobs.store_at(run.shared, keep=2)
    try:
        before = jobs.rate(job, window)
        s0 = job.app.stats()
        start = time.monotonic()
        cks, felt = [], []
        while time.monotonic() - start < window:
            tick = start + len(cks) * interval
            time.sleep(max(0.0, tick - time.monotonic()))
            ck, thread = jobs.async_checkpoint(job, run.staging, store, JOB, commit_idle=(priority == "idle"))
            felt.append(jobs.felt(job, ck))
            thread.join()  # triggers of one job are serialised (DESIGN invariant 5)
            if ck.error:
                raise BenchError(f"background commit failed: {ck.error}")
            cks.append(ck)
            if time.monotonic() - start + interval > window:
                break
        time.sleep(max(0.0, start + window - time.monotonic()))
        s1 = job.app.stats()
        after = jobs.rate(job, window)
    finally:
        job.stop()
        store.remove_job(JOB)
    span = (s1.now_ns - s0.now_ns) / 1e9
    with_ck = (s1.iters - s0.iters) / span
    plain = (before + after) / 2
    lost = max(0.0, (plain - with_ck) * span / plain)  # seconds of app progress lost
    per_ck = lost / len(cks)
    row = {"mib": mib, "commit_priority": priority, "window_s": span, "checkpoints": len(cks),
           "rate_plain": [before, after], "rate_with_checkpoints": with_ck, "lost_s": lost,
           "lost_per_checkpoint_s": per_ck, "felt_s": felt, "image_bytes": median([c.image_bytes for c in cks]),
           "checkpoints_detail": [_ck_dict(c) for c in cks]}
    label = f"{mib} MiB job, commit {priority}"
    run.add(Figure("periodic", f"throughput, a checkpoint every {interval:g} s, {label}", with_ck, "it/s",
                   baseline=plain, baseline_name="no checkpoints",
                   note=(f"{len(cks)} checkpoints in {span:.0f} s (freeze {median(felt):.2f} s, commit "
                         f"{median([c.commit_s for c in cks]):.1f} s each); {per_ck:.2f} s of app progress lost "
                         f"per checkpoint; no-checkpoint rates before/after: {before:.0f}/{after:.0f} it/s")))
    run.add(Figure("periodic", f"cost at a 30-min interval, {label}", 100 * per_ck / 1800, "%", goal=("<", 1.0)))
    return row


def _extrapolate(run: Run, rows: list[dict], priority: str) -> None:
    """A 16 GB job: lost time per checkpoint grows with the image (freeze and background
    work both scale with bytes). Fit a line through the measured sizes; never assume
    better than proportional to the largest."""
    if not rows:
        return
    xs = [r["image_bytes"] for r in rows]
    ys = [r["lost_per_checkpoint_s"] for r in rows]
    target = 16e9
    if len(xs) >= 2 and xs[-1] != xs[0]:
        slope = (ys[-1] - ys[0]) / (xs[-1] - xs[0])
        est = max(ys[-1] + slope * (target - xs[-1]), ys[-1] * target / xs[-1])
        how = "linear through the measured sizes, or proportional to the largest, whichever is worse"
    else:
        est = ys[-1] * target / xs[-1]
        how = "proportional to the one measured size"
    run.add(Figure("periodic", f"cost at a 30-min interval, 16 GB job, commit {priority} (EXTRAPOLATED)",
                   100 * est / 1800, "%", goal=("<", 1.0),
                   note=(f"{est:.1f} s lost per checkpoint, {how} "
                         f"({', '.join(f'{x / 1e9:.1f} GB: {y:.1f} s' for x, y in zip(xs, ys))}); "
                         "not measured: a 16 GB job and its staging do not fit here")))
    run.details.setdefault("periodic_extrapolation", {})[priority] = {  # type: ignore[union-attr]
        "target_bytes": target, "lost_per_checkpoint_s": est, "method": how}


def bench_scaling(run: Run) -> None:
    """Benchmark 5: freeze, commit and restore vs image size; jobs checkpointing at once."""
    jobs = _engine()
    rows = []
    for mib in run.args.sizes_mib:
        log(f"scaling: {mib} MiB")
        run.need(2 * mib * MiB, f"a {mib} MiB job and its staged image")
        job = jobs.Job(run.staging, mib, f"scaling-{mib}")
        store = jobs.store_at(run.shared)
        try:
            # Raw dumps before and after slurm_mm's (A-B-A): on this VM a dump's speed
            # depends on how recently its memory was touched (free page reporting).
            raw_s = [_raw_dump(run, job)]
            ck, thread = jobs.async_checkpoint(job, run.staging, store, JOB,
                                               commit_idle=run.args.commit_priority[0] == "idle")
            felt = jobs.felt(job, ck)
            thread.join()
            if ck.error:
                raise BenchError(f"background commit failed: {ck.error}")
            raw_s.append(_raw_dump(run, job))
            job.stop()
            dest = run.staging / "scaling-restore"
            shutil.rmtree(dest, ignore_errors=True)
            t0 = time.monotonic()
            store.extract_latest(JOB, dest)
            extract_s = time.monotonic() - t0
            restore_s = jobs.restore_job(job, dest)
            shutil.rmtree(dest)
        finally:
            job.stop()
            store.remove_job(JOB)
        row = {"mib": mib, **_ck_dict(ck), "felt_s": felt, "raw_dump_s": median(raw_s), "raw_dumps_s": raw_s,
               "extract_s": extract_s, "restore_s": restore_s}
        rows.append(row)
        run.add(Figure("scaling", f"freeze felt, {mib} MiB", felt, "s", baseline=median(raw_s),
                       baseline_name="criu dump -R, before+after", baseline_samples=raw_s,
                       note=f"image {ck.image_bytes / 1e9:.2f} GB, stored {ck.stored_bytes / 1e9:.2f} GB"))
        run.add(Figure("scaling", f"background commit, {mib} MiB", mbps(ck.image_bytes, ck.commit_s), "MB/s",
                       note=f"{ck.commit_s:.1f} s"))
        run.add(Figure("scaling", f"restore (extract + criu restore), {mib} MiB", extract_s + restore_s, "s",
                       note=f"extract {extract_s:.2f} s + restore {restore_s:.2f} s"))
    run.details["scaling_size"] = rows

    crows = []
    mib = run.args.concurrent_mib
    parallel = run.args.parallel_dumps
    for n in run.args.jobs:
        log(f"scaling: {n} jobs of {mib} MiB at once ({'parallel' if parallel else 'one dump at a time'})")
        run.need(2 * n * mib * MiB, f"{n} jobs of {mib} MiB and their staged images")
        store = jobs.store_at(run.shared)
        started: list = []
        lock = None if parallel else threading.Lock()
        idle = run.args.commit_priority[0] == "idle"
        results: list = [None] * n
        felt_by: dict[int, float] = {}
        errors: list[str] = []
        try:
            for k in range(n):
                started.append(jobs.Job(run.staging, mib, f"concurrent-{k}"))

            def one(k: int) -> None:
                try:
                    ck, thread = jobs.async_checkpoint(started[k], run.staging, store, f"{JOB}{k}",
                                                       dump_lock=lock, commit_idle=idle)
                    # Now: the app's stall log is a ring, and CPU contention later adds entries.
                    felt_by[k] = jobs.felt(started[k], ck)
                    thread.join()
                    results[k] = ck
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    errors.append(f"{type(exc).__name__}: {exc}")

            threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            errors += [c.error for c in results if c is not None and c.error]
            done = [(k, c) for k, c in enumerate(results) if c is not None and not c.error]
            felt = [felt_by[k] for k, _ in done]
        finally:
            for j in started:
                j.stop()
            for k in range(n):
                store.remove_job(f"{JOB}{k}")
        if not done:
            raise BenchError(f"{n} concurrent checkpoints all failed: {errors[:1]}")
        cks = [c for _, c in done]
        wall = (max(c.done_ns for c in cks) - min(c.t0_ns for c in cks)) / 1e9
        total = sum(c.image_bytes for c in cks)
        crows.append({"jobs": n, "mib": mib, "parallel_dumps": parallel, "commit_idle": idle, "felt_s": felt, "wall_s": wall,
                      "bytes": total, "errors": errors, "checkpoints": [_ck_dict(c) for c in cks]})
        run.add(Figure("scaling", f"{n} jobs x {mib} MiB at once: longest freeze", max(felt), "s",
                       note=(f"all committed in {wall:.1f} s, {mbps(total, wall):.0f} MB/s together; dumps "
                             + ("in parallel" if parallel else "one at a time (node lock)")
                             + f"; commits at {'idle' if idle else 'normal'} priority"
                             + (f"; {len(errors)} FAILED: {errors[0][:160]}" if errors else ""))))
    _parallel_dump_probe(run, jobs)
    run.details["scaling_jobs"] = crows


# ----------------------------------------------------------------------------- main

BENCHES: dict[str, Callable[[Run], None]] = {
    "store": bench_store,
    "freeze": bench_freeze,
    "overhead": bench_overhead,
    "periodic": bench_periodic,
    "scaling": bench_scaling,
}


def _mib_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of MiB") from None
    if not values or any(v < 16 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: sizes are MiB, at least 16")
    return values


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: values must be >= 1")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", default="all",
                   help=f"comma-separated: {', '.join(BENCHES)} or all (default all)")
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke run (~minutes)")
    p.add_argument("--repeat", type=int, default=None, help="repeats per measurement (default 3, quick 1)")
    p.add_argument("--store-sizes-mib", type=_mib_list, default=None, help="store bench sizes (default 1024,4096)")
    p.add_argument("--commit-levels", type=_int_list, default=[], help="extra zstd levels for full commits")
    p.add_argument("--level-sample-mib", type=int, default=None, help="sample for the zstd level table (256)")
    p.add_argument("--decision-mib", type=int, default=None, help="image size for the compress-decision check")
    p.add_argument("--sizes-mib", type=_mib_list, default=None,
                   help="scaling bench job sizes (default 1024,2048,4096,6144: what fits 16 GiB with tmpfs staging)")
    p.add_argument("--jobs", type=_int_list, default=None, help="concurrent jobs for scaling (default 1,2,4)")
    p.add_argument("--concurrent-mib", type=int, default=None, help="size of each concurrent job (default 1024)")
    p.add_argument("--parallel-dumps", action="store_true",
                   help="concurrent jobs dump at the same time (default: one dump at a time, commits overlap)")
    p.add_argument("--probe-tries", type=int, default=None, help="pairs of simultaneous dumps to try, per /proc mode (default 20)")
    p.add_argument("--commit-priority", default="normal",
                   help="priority of the background commit: normal, idle (SCHED_IDLE) or normal,idle "
                        "(periodic bench measures each; other benches use the first)")
    p.add_argument("--freeze-sizes-mib", type=_mib_list, default=None, help="freeze bench sizes (default 1024,4096)")
    p.add_argument("--overhead-mib", type=_mib_list, default=None, help="overhead bench job sizes (default 512,2048)")
    p.add_argument("--periodic-sizes-mib", type=_mib_list, default=None,
                   help="periodic bench job sizes (default 1024,4096)")
    p.add_argument("--periodic-seconds", type=float, default=None, help="measuring window (default 90)")
    p.add_argument("--interval", type=float, default=None, help="checkpoint interval in the periodic bench (15)")
    p.add_argument("--shared", type=Path, default=Path("/var/tmp/slurm_mm-bench/shared"),
                   help="stand-in for the shared filesystem (default on the root disk)")
    p.add_argument("--staging", type=Path, default=Path("/dev/shm/slurm_mm-bench"),
                   help="node-local staging (default tmpfs)")
    p.add_argument("--mem-budget-gib", type=float, default=16.0, help="RAM the run may use (app + tmpfs)")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default benchmarks/out/results-DATE.json)")
    p.add_argument("--keep", action="store_true", help="keep scratch directories")
    p.add_argument("--plots", type=Path, default=None, metavar="DIR",
                   help="also draw PNG plots into DIR (needs matplotlib; see plots.py)")
    args = p.parse_args(argv)
    names = list(BENCHES) if args.bench == "all" else [b.strip() for b in args.bench.split(",")]
    unknown = [b for b in names if b not in BENCHES]
    if unknown:
        p.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHES)}")
    args.benches = names
    args.commit_priority = [x.strip() for x in args.commit_priority.split(",") if x.strip()]
    if not args.commit_priority or any(x not in ("normal", "idle") for x in args.commit_priority):
        p.error("--commit-priority: normal, idle or normal,idle")
    q = args.quick
    args.repeat = args.repeat or (1 if q else 3)
    args.store_sizes_mib = args.store_sizes_mib or ([128] if q else [1024, 4096])
    args.level_sample_mib = args.level_sample_mib or (32 if q else 256)
    args.decision_mib = args.decision_mib or (64 if q else 512)
    args.sizes_mib = args.sizes_mib or ([128, 256] if q else [1024, 2048, 4096, 6144])
    args.jobs = args.jobs or ([1, 2] if q else [1, 2, 4])
    args.probe_tries = (3 if q else 20) if args.probe_tries is None else args.probe_tries
    args.concurrent_mib = args.concurrent_mib or (128 if q else 1024)
    args.freeze_sizes_mib = args.freeze_sizes_mib or ([128] if q else [1024, 4096])
    args.overhead_mib = args.overhead_mib or ([128] if q else [512, 2048])
    args.periodic_sizes_mib = args.periodic_sizes_mib or ([128, 256] if q else [1024, 4096])
    args.periodic_seconds = args.periodic_seconds or (15.0 if q else 90.0)
    args.interval = args.interval or (5.0 if q else 15.0)
    args.out = args.out or HERE / "out" / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("run_benchmarks: needs root (CRIU)", file=sys.stderr)
        return 2
    run = Run(args)
    run.setup()
    info = machine(run.shared, run.staging)
    log("machine:", json.dumps(info))
    failed: list[str] = []
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}

    def save() -> None:
        run.details["failed"] = failed
        run.details["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
        write_json(args.out, machine_info=info, config=config, figures=run.figures, details=run.details)

    try:
        app_mod.build()
        for name in args.benches:
            log(f"== {name}")
            t0 = time.monotonic()
            try:
                BENCHES[name](run)
            except BenchError as exc:
                failed.append(f"{name}: {exc}")
                log(f"{name}: FAILED: {exc}")
            except Exception as exc:  # noqa: BLE001 - slurm_mm itself failed: report it, go on
                failed.append(f"{name}: {type(exc).__name__}: {exc}")
                log(f"{name}: FAILED: {type(exc).__name__}: {exc}")
            run.details.setdefault("elapsed_s", {})[name] = time.monotonic() - t0  # type: ignore[union-attr]
            save()  # after each benchmark: a run cut short keeps what it measured
    finally:
        save()
        if not args.keep:
            run.cleanup()
    print(table(run.figures))
    print(f"\nresults: {args.out}")
    if args.plots:
        import plots
        if plots.main([str(args.out), "--out", str(args.plots)]):
            print("no plots (matplotlib missing: /opt/slurm_mm/venv/bin/pip install matplotlib)")
    for line in failed:
        print(f"FAILED {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
