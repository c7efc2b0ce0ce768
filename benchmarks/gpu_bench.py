"""GPU part of issue 5's benchmarks (1 freeze, 2 overhead, 5 scaling): run on a GPU node.

    python3 benchmarks/gpu_bench.py --gb 8,32 --out $OUT/gpu_bench.json

as root, from the repository root, on a machine with an NVIDIA GPU, the CUDA checkpoint
API (driver >= 550), PyTorch with CUDA, and CRIU 4.2+ (found as --criu, $SLURM_MM_CRIU,
.carry/criu/criu, then /opt/slurm_mm/criu/sbin/criu). zstandard and filelock (for the
store) are taken from benchmarks/out/wheels/ when the Python there lacks them; without
them the store steps are skipped and said so.

Per GPU memory size G (the workload, gpu_workload.py, holds G GB of random data on the
GPU and logs its own stalls):
  async   slurm_mm: engine.checkpoint_tree(gpu=...) into tmpfs staging with the job left
          running (GPU checkpoint -> criu dump -> GPU restore), then the store commits it
          in the background while the job runs. App-felt freeze = the stall it logged.
  serial  the baseline of issue 5: GPU checkpoint -> criu dump straight to the shared dir
          -> GPU restore (engine, images in --shared). Goal: async <= 0.5x serial.
  serial+fsync  as serial, but the GPU is given back only once the image is on the
          disk (fsync): on a local stand-in a dump otherwise ends in the page cache,
          where a real shared filesystem would take the bytes at its own speed.
  serial+commit (sizes where the disk holds two copies): as serial, but the job resumes
          only after the store committed the image (a synchronous, verified checkpoint).
  overhead (smallest size): the same chain by hand (cuda-checkpoint --toggle if
          installed, else the driver calls of slurm_mm's GpuCheckpointer; raw `criu dump`)
          vs engine.checkpoint_tree; raw `criu restore` + GPU restore vs engine.restore_tree.
          Goal <= 1.15x.
  restore (every size): kill the job, restore it from the async image, check that the
          app iterates and that its GPU data is intact.
Every step appends to the JSON (--out) as it ends, so a run cut short still reports.
The shared directory is a local stand-in (--shared, default /var/tmp): say so with figures.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(HERE), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)


def _wheels() -> str:
    """Make zstandard/filelock importable from benchmarks/out/wheels if they are missing."""
    missing = []
    for mod in ("zstandard", "filelock"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if not missing:
        return "installed"
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    site = HERE / "out" / f"site-{tag}"
    for mod in missing:
        cands = sorted(glob.glob(str(HERE / "out" / "wheels" / f"{mod}-*-{tag}-*.whl")) +
                       glob.glob(str(HERE / "out" / "wheels" / f"{mod}-*-py3-none-any.whl")))
        if cands:
            with zipfile.ZipFile(cands[-1]) as z:
                z.extractall(site)
    sys.path.insert(0, str(site))
    try:
        for mod in missing:
            __import__(mod)
    except ImportError as exc:
        return f"missing ({exc})"
    return f"from {site}"


WHEELS = _wheels()


def find_criu(explicit: str | None) -> str:
    for c in (explicit, os.environ.get("SLURM_MM_CRIU"), str(REPO / ".carry/criu/criu"),
              "/opt/slurm_mm/criu/sbin/criu"):
        if c and os.access(c, os.X_OK):
            return c
    raise SystemExit("gpu_bench: no CRIU found (--criu, $SLURM_MM_CRIU, .carry/criu/criu)")


ARGS = None


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", default="8,32", help="GPU memory sizes in GB (default 8,32)")
    p.add_argument("--content", choices=("random", "pattern"), default="random",
                   help="GPU data: random (incompressible, like weights) or a compressible pattern")
    p.add_argument("--criu", default=None)
    p.add_argument("--shared", type=Path, default=Path("/var/tmp/slurm_mm-bench-gpu/shared"))
    p.add_argument("--staging", type=Path, default=Path("/dev/shm/slurm_mm-bench-gpu"))
    p.add_argument("--out", type=Path, default=HERE / "out" / "gpu_bench.json")
    p.add_argument("--skip", default="", help="comma-separated steps to skip: serial_sync,serial_commit,overhead,restore,commit")
    p.add_argument("--overhead-all", action="store_true", help="overhead at every size, not only the smallest")
    p.add_argument("--no-gpu", action="store_true",
                   help="smoke-test this harness on a machine without a GPU (workload on CPU, no GPU steps)")
    p.add_argument("--deadline", type=float, default=560.0,
                   help="seconds after which no new step starts (device commands end at 600)")
    args = p.parse_args(argv)
    args.sizes = [float(x) for x in args.gb.split(",") if x.strip()]
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    return args


args = parse() if __name__ == "__main__" else None
CRIU_PATH = find_criu(args.criu if args else None)
os.environ["SLURM_MM_BENCH_CRIU"] = CRIU_PATH

import raw  # noqa: E402
from app import read_stats  # noqa: E402
from report import Figure, table  # noqa: E402
from slurm_mm.engine.checkpoint import checkpoint_tree  # noqa: E402
from slurm_mm.engine.criu import Criu  # noqa: E402
from slurm_mm.engine.gpu import GpuCheckpointer  # noqa: E402
from slurm_mm.engine.restore import restore_tree  # noqa: E402

try:
    from slurm_mm.store import ImageStore
except ImportError:  # no zstandard/filelock: no store steps
    ImageStore = None  # type: ignore[assignment,misc]

T0 = time.monotonic()
WORKLOAD = HERE / "gpu_workload.py"
CRIU = Criu(CRIU_PATH, prlimit_shim=None)  # the workload runs as root: no shim needed


def say(*parts) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s]", *parts, flush=True)


def become_subreaper() -> None:
    """Orphans of dumped/restored trees come to us, not to a PID 1 that reaps late."""
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


class GpuJob:
    """gpu_workload.py as a session leader (what CRIU needs without -j)."""

    def __init__(self, workdir: Path, gb: float, content: str) -> None:
        self.dir = workdir
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        self.stats_path = workdir / "stats"
        log = open(workdir / "workload.log", "ab")  # O_APPEND: restores keep their offset
        self.proc = subprocess.Popen([sys.executable, str(WORKLOAD), "--gb", str(gb), "--stats",
                                      str(self.stats_path), "--content", content,
                                      "--device", "cpu" if args.no_gpu else "cuda"],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        self.pid = self.proc.pid
        deadline = time.monotonic() + 300
        while True:
            s = read_stats(self.stats_path)
            if s and s.iters > 200:
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"gpu_workload exited {self.proc.returncode}: "
                                   f"{(workdir / 'workload.log').read_text()[-800:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("gpu_workload not ready after 300 s")
            time.sleep(0.1)

    def stats(self):
        return read_stats(self.stats_path)

    def field(self, name: str) -> int | None:
        for line in self.stats_path.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == name:
                return int(v)
        return None

    def felt(self, t0: int, t1: int) -> float:
        time.sleep(0.2)
        return self.stats().longest_stall_in(t0, t1)

    def iterating(self, timeout: float = 60) -> bool:
        before = self.stats().iters
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stats().iters > before:
                return True
            time.sleep(0.05)
        return False

    def data_ok(self, timeout: float = 120) -> bool:
        """Ask the app to check its GPU data (SIGUSR1); True if it says intact."""
        before = self.field("checks") or 0
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.field("checks") or 0) > before:
                return self.field("data_ok") == 1
            time.sleep(0.1)
        return False

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                done = self.pid
            if done and not Path(f"/proc/{self.pid}").exists():
                return
            time.sleep(0.05)

    def adopt(self, pid: int) -> None:
        """After a restore: the same job under a (restored) root pid, our child."""
        self.proc = None
        self.pid = pid


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class Results:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.figures: list[Figure] = []
        self.steps: list[dict] = []
        self.machine = machine()

    def step(self, **row) -> dict:
        row["at_s"] = round(time.monotonic() - T0, 1)
        self.steps.append(row)
        say(json.dumps(row, default=str)[:400])
        self.save()
        return row

    def add(self, f: Figure) -> None:
        self.figures.append(f)
        self.save()

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        data = {"machine": self.machine, "figures": [f.to_dict() for f in self.figures], "steps": self.steps}
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(self.out)


def machine() -> dict:
    def cmd(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
        except OSError:
            return ""
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "?")
    mem = next((int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines()
                if l.startswith("MemTotal:")), 0)
    return {"uname": " ".join(os.uname()), "cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem / 2**20, 1),
            "os": cmd(["sh", "-c", ". /etc/os-release; echo $PRETTY_NAME"]),
            "gpu": cmd(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]),
            "criu": raw.criu_version(), "python": sys.version.split()[0], "store_libs": WHEELS,
            "thp": cmd(["cat", "/sys/kernel/mm/transparent_hugepage/enabled"]),
            "cuda_checkpoint_tool": shutil.which("cuda-checkpoint") or "none",
            "shared": f"{args.shared} ({cmd(['df', '--output=fstype,size,avail', '-h', str(args.shared)])})",
            "staging": f"{args.staging} ({cmd(['df', '--output=fstype,size,avail', '-h', str(args.staging)])})"}


def commit(store, images: Path, job_id: str) -> tuple[float, int]:
    t0 = time.monotonic()
    image = store.commit(job_id, images, epoch=0, uid=0, gid=0, node=os.uname().nodename, trigger="periodic",
                         criu_version=CRIU.version())
    return time.monotonic() - t0, sum(f.stored_size for f in image.manifest.files)


class RawGpu:
    """The GPU step by hand: NVIDIA's cuda-checkpoint tool if installed, else the plain
    driver calls (slurm_mm's GpuCheckpointer, the thinnest wrapper we have)."""

    def __init__(self, gc: GpuCheckpointer | None) -> None:
        self.tool = shutil.which("cuda-checkpoint") if gc else None
        self.gc = gc
        self.name = ("cuda-checkpoint --toggle" if self.tool else "driver calls (GpuCheckpointer)") if gc else "no GPU"

    def toggle(self, pid: int, *, suspend: bool) -> None:
        if self.gc is None:
            return
        if self.tool:
            subprocess.run([self.tool, "--toggle", "--pid", str(pid)], check=True, timeout=600)
        elif suspend:
            self.gc.suspend([pid])
        else:
            self.gc.resume([pid])


def run() -> int:
    become_subreaper()
    res = Results(args.out)
    say("machine:", json.dumps(res.machine))
    gc = None if args.no_gpu else GpuCheckpointer.open()
    if gc is None and not args.no_gpu:
        say("no CUDA checkpoint API here: nothing to measure")
        return 2
    for d in (args.shared, args.staging):
        d.mkdir(parents=True, exist_ok=True)
    store = ImageStore(args.shared / "store", level=3, threads=0, keep=1) if ImageStore else None
    if store is None:
        say(f"store unavailable ({WHEELS}): commit steps skipped")
    rawgpu = RawGpu(gc)
    failures = []
    for n, gb in enumerate(args.sizes):
        if time.monotonic() - T0 > args.deadline:
            failures.append(f"{gb} GB: not started, past the --deadline")
            break
        try:
            one_size(res, gc, store, rawgpu, gb, overhead=(n == 0 or args.overhead_all))
        except Exception as exc:  # noqa: BLE001 - report and go on with the next size
            failures.append(f"{gb} GB: {type(exc).__name__}: {exc}")
            res.step(size_gb=gb, step="failed", error=str(exc)[:2000])
    if gc is not None:
        gc.close()
    res.steps.append({"failures": failures})
    res.save()
    print(table(res.figures))
    for f in failures:
        print("FAILED", f)
    shutil.rmtree(args.staging, ignore_errors=True)
    shutil.rmtree(args.shared, ignore_errors=True)
    return 1 if failures else 0


def one_size(res: Results, gc, store, rawgpu: RawGpu, gb: float, overhead: bool) -> None:
    late = lambda: time.monotonic() - T0 > args.deadline  # noqa: E731
    if free_bytes(args.staging) < 1.1 * gb * 1e9:
        raise RuntimeError(f"{args.staging} has {free_bytes(args.staging) / 1e9:.0f} GB free; "
                           f"a {gb:g} GB image does not fit")
    job = GpuJob(args.staging / f"job-{gb:g}", gb, args.content)
    jid = f"gpu{gb:g}".replace(".", "_")
    a_img = args.staging / f"async-{gb:g}"
    try:
        say(f"== {gb:g} GB: async")
        r0 = job.stats()
        time.sleep(1.0)
        r1 = job.stats()
        rate = (r1.iters - r0.iters) / ((r1.now_ns - r0.now_ns) / 1e9)
        t0 = time.monotonic_ns()
        ck = checkpoint_tree(job.pid, a_img, leave_running=True, gpu=gc, criu=CRIU)
        t1 = time.monotonic_ns()
        felt_async = job.felt(t0, t1)
        ok = job.data_ok()
        commit_s = stored = None
        if store is not None and "commit" not in args.skip:
            store.remove_job(jid)
            store.prepare_job(jid, 0, 0)
            box = {}
            s0 = job.stats()
            th = threading.Thread(target=lambda: box.update(r=commit(store, a_img, jid)))
            th.start()
            th.join()
            s1 = job.stats()
            commit_s, stored = box["r"]
            store.remove_job(jid)  # the disk must hold the serial dump next
            during = (s1.iters - s0.iters) / ((s1.now_ns - s0.now_ns) / 1e9)
        else:
            during = None
        res.step(size_gb=gb, step="async", felt_s=felt_async, blocked_s=(t1 - t0) / 1e9, timings=ck.timings,
                 image_bytes=ck.image_bytes, data_ok=ok, commit_s=commit_s, stored_bytes=stored,
                 rate_before=rate, rate_during_commit=during)

        say(f"== {gb:g} GB: serial (GPU checkpoint -> dump to shared -> GPU restore)")
        s_img = args.shared / f"serial-{gb:g}"
        if free_bytes(args.shared) < 1.1 * ck.image_bytes:
            raise RuntimeError(f"{args.shared} has {free_bytes(args.shared) / 1e9:.0f} GB free, the serial dump "
                               f"needs {ck.image_bytes / 1e9:.0f} GB: pass --shared on a larger disk")
        t0 = time.monotonic_ns()
        sk = checkpoint_tree(job.pid, s_img, leave_running=True, gpu=gc, criu=CRIU)
        t1 = time.monotonic_ns()
        felt_serial = job.felt(t0, t1)
        shutil.rmtree(s_img, ignore_errors=True)
        res.step(size_gb=gb, step="serial", felt_s=felt_serial, blocked_s=(t1 - t0) / 1e9, timings=sk.timings,
                 data_ok=job.data_ok())
        felt_sync = None
        if "serial_sync" not in args.skip and not late():
            # On a local stand-in the dump lands in the page cache and is not on storage when
            # the job resumes; a real shared filesystem takes the bytes at its own speed.
            # This variant resumes only once the image is on the disk (fsync).
            say(f"== {gb:g} GB: serial + fsync (dump to shared, fsync, then GPU restore)")
            y_img = args.shared / f"serial-sync-{gb:g}"
            t0 = time.monotonic_ns()
            pids = raw.tree(job.pid)
            gpids = gc.suspend(pids) if gc else []
            try:
                yk = checkpoint_tree(job.pid, y_img, leave_running=True, criu=CRIU)
                t_sync = time.monotonic()
                for f in y_img.iterdir():
                    fd = os.open(f, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                sync_s = time.monotonic() - t_sync
            finally:
                if gc:
                    gc.resume(gpids)
            t1 = time.monotonic_ns()
            shutil.rmtree(y_img, ignore_errors=True)
            felt_sync = job.felt(t0, t1)
            res.step(size_gb=gb, step="serial_sync", felt_s=felt_sync, dump_s=yk.timings.get("dump"), fsync_s=sync_s,
                     data_ok=job.data_ok())
        res.add(Figure("freeze", f"GPU {gb:g} GB: app-felt freeze", felt_async, "s", baseline=felt_serial,
                       baseline_name="serial", goal=("<=", 0.5),
                       note=(f"async: gpu {ck.timings.get('gpu_suspend', 0):.1f} + dump "
                             f"{ck.timings.get('dump', 0):.1f} + gpu {ck.timings.get('gpu_resume', 0):.1f} s; serial: "
                             f"gpu {sk.timings.get('gpu_suspend', 0):.1f} + dump {sk.timings.get('dump', 0):.1f} + gpu "
                             f"{sk.timings.get('gpu_resume', 0):.1f} s; image {ck.image_bytes / 1e9:.1f} GB"
                             + (f"; background commit {commit_s:.1f} s" if commit_s else ""))))
        if felt_sync is not None:
            res.add(Figure("freeze", f"GPU {gb:g} GB: app-felt freeze vs serial + fsync", felt_async, "s",
                           baseline=felt_sync, baseline_name="serial+fsync", goal=("<=", 0.5),
                           note="serial resumes once the dump is on the (stand-in) shared disk"))

        need = 2.2 * ck.image_bytes
        if store is not None and "serial_commit" not in args.skip and not late() and free_bytes(args.shared) > need:
            say(f"== {gb:g} GB: serial + commit")
            sc_img = args.shared / f"serial-commit-{gb:g}"
            store.remove_job(jid)
            store.prepare_job(jid, 0, 0)
            t0 = time.monotonic_ns()
            pids = raw.tree(job.pid)
            gpids = gc.suspend(pids) if gc else []
            try:
                sck = checkpoint_tree(job.pid, sc_img, leave_running=False, criu=CRIU,
                                      extra_criu_args=["--leave-stopped"])
                c_s, _ = commit(store, sc_img, jid)
            finally:
                raw.resume(pids)
                if gc:
                    gc.resume(gpids)
            t1 = time.monotonic_ns()
            shutil.rmtree(sc_img, ignore_errors=True)
            felt_sc = job.felt(t0, t1)
            res.step(size_gb=gb, step="serial_commit", felt_s=felt_sc, dump_s=sck.timings.get("dump"), commit_s=c_s,
                     data_ok=job.data_ok())
            res.add(Figure("freeze", f"GPU {gb:g} GB: app-felt freeze vs serial + commit", felt_async, "s",
                           baseline=felt_sc, baseline_name="serial+commit", goal=("<=", 0.5)))
        if store is not None:
            store.remove_job(jid)

        if overhead and "overhead" not in args.skip and not late():
            say(f"== {gb:g} GB: overhead (by hand: {rawgpu.name} + criu dump)")
            r_img = args.staging / f"raw-{gb:g}"
            t0 = time.monotonic()
            rawgpu.toggle(job.pid, suspend=True)
            t_gpu = time.monotonic()
            raw_dump = raw.criu_dump(job.pid, r_img, args.staging / "raw-log", leave="running")
            t_dump = time.monotonic()
            rawgpu.toggle(job.pid, suspend=False)
            raw_ck = time.monotonic() - t0
            res.step(size_gb=gb, step="raw_checkpoint", total_s=raw_ck, gpu_suspend_s=t_gpu - t0,
                     dump_s=raw_dump, gpu_resume_s=time.monotonic() - t_dump, tool=rawgpu.name)
            # slurm_mm before (the async checkpoint) and after the raw chain: A-B-A.
            m_img = args.staging / f"mm-{gb:g}"
            t0 = time.monotonic()
            checkpoint_tree(job.pid, m_img, leave_running=True, gpu=gc, criu=CRIU)
            mm_again = time.monotonic() - t0
            shutil.rmtree(m_img, ignore_errors=True)
            mm_ck = (ck.timings.get("total", 0.0) + mm_again) / 2
            res.step(size_gb=gb, step="mm_checkpoint_again", total_s=mm_again)
            res.add(Figure("overhead", f"GPU {gb:g} GB: checkpoint", mm_ck, "s", baseline=raw_ck,
                           baseline_name=f"{rawgpu.name} + criu dump", goal=("<=", 1.15),
                           samples=[ck.timings.get("total", 0.0), mm_again],
                           note="engine.checkpoint_tree to tmpfs staging, before and after the raw chain"))
            # Restore by hand from the raw image, then slurm_mm's from the async one.
            job.kill()
            t0 = time.monotonic()
            pid, crs = raw.criu_restore(r_img, args.staging / "raw-log")
            job.adopt(pid)
            t_cr = time.monotonic()
            rawgpu.toggle(pid, suspend=False)
            raw_rs = time.monotonic() - t0
            ok = job.iterating() and job.data_ok()
            res.step(size_gb=gb, step="raw_restore", total_s=raw_rs, criu_restore_s=crs,
                     gpu_resume_s=time.monotonic() - t_cr, intact=ok)
            shutil.rmtree(r_img, ignore_errors=True)
            job.kill()
            t0 = time.monotonic()
            tree = restore_tree(a_img, gpu=gc, criu=CRIU)
            mm_rs = time.monotonic() - t0
            job.adopt(tree.init_pid)
            ok = job.iterating() and job.data_ok()
            res.step(size_gb=gb, step="restore", total_s=mm_rs, timings=tree.timings, intact=ok)
            res.add(Figure("overhead", f"GPU {gb:g} GB: restore", mm_rs, "s", baseline=raw_rs,
                           baseline_name=f"criu restore + {rawgpu.name}", goal=("<=", 1.15),
                           note=f"restored job intact: {ok}"))
        elif "restore" not in args.skip and not late():
            say(f"== {gb:g} GB: restore")
            job.kill()
            t0 = time.monotonic()
            tree = restore_tree(a_img, gpu=gc, criu=CRIU)
            mm_rs = time.monotonic() - t0
            job.adopt(tree.init_pid)
            ok = job.iterating() and job.data_ok()
            res.step(size_gb=gb, step="restore", total_s=mm_rs, timings=tree.timings, intact=ok)
        last = [s for s in res.steps if s.get("step") == "restore" and s.get("size_gb") == gb]
        if last:
            res.add(Figure("scaling", f"GPU {gb:g} GB: restore (criu restore + GPU restore)", last[-1]["total_s"],
                           "s", note=f"intact: {last[-1]['intact']}; {last[-1]['timings']}"))
        if commit_s:
            res.add(Figure("scaling", f"GPU {gb:g} GB: background commit", ck.image_bytes / commit_s / 1e6, "MB/s",
                           note=f"{commit_s:.1f} s; app ran at {during / rate:.0%} of its speed meanwhile"
                           if during else f"{commit_s:.1f} s"))
    finally:
        job.kill()
        shutil.rmtree(a_img, ignore_errors=True)
        if store is not None:
            store.remove_job(jid)


if __name__ == "__main__":
    sys.exit(run())
