"""Where a GPU job's first step after a restore goes, and what a restore without the
driver's restore leaves (the path `srun` step tasks took before their GPU inventory was kept).

    python3 benchmarks/gpu_first_step.py --rounds 13,4 --out $OUT/first_step.json [--unrestored-gb 1]

as root on the GPU machine (same needs as gpu_bench.py). Per round, a job holding GB of
random data on the GPU (gpu_workload.py, with SLURM_MM_BENCH_TRACE: its own per-iteration
launch/sync times around the restore) is checkpointed to tmpfs (job stopped), caches are
dropped, and it is restored (engine.restore_tree with the GPU checkpointer). From the
outside, every 100 ms until the app iterates again: per thread state, user/system CPU,
kernel wait channel and top kernel stack frames, the process's page faults and resident
huge pages, /proc/vmstat's fault counters; and `nvidia-smi dmon` (PCIe rx/tx, SM and memory
utilisation) each second. Then the app checks its GPU data.
`--unrestored-gb`: a job restored by CRIU with no driver restore: its CUDA state, whether it
makes progress in 15 s; then the driver's restore is run late and the job must go on intact.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import gpu_bench as gb  # noqa: E402

VMSTAT = ("pgfault", "pgmajfault", "thp_fault_alloc", "thp_fault_fallback", "pgfree", "compact_stall",
          "thp_collapse_alloc", "pgalloc_normal")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", default="13", help="GPU GB of each round")
    p.add_argument("--unrestored-gb", type=float, default=0.0)
    p.add_argument("--staging", type=Path, default=Path("/dev/shm/slurm_mm-first-step"))
    p.add_argument("--out", type=Path, default=HERE / "out" / "first_step.json")
    p.add_argument("--deadline", type=float, default=400.0)
    p.add_argument("--no-gpu", action="store_true", help="smoke-test the harness (job on the CPU, no GPU steps)")
    return p.parse_args()


def say(*parts) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s]", *parts, flush=True)


def vmstat() -> dict[str, int]:
    out = {}
    for line in Path("/proc/vmstat").read_text().splitlines():
        k, _, v = line.partition(" ")
        if k in VMSTAT:
            out[k] = int(v)
    return out


def read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


class Sampler(threading.Thread):
    """Samples a restored pid's threads every 100 ms (state, CPU, faults, kernel stack)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.rows: list[dict] = []
        self.done = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        hz = os.sysconf("SC_CLK_TCK")
        last: dict[str, tuple[int, int]] = {}
        vm0 = vmstat()
        while not self.done.wait(0.1):
            row: dict = {"t": round(time.monotonic() - self.t0, 2), "threads": []}
            try:
                tids = sorted(os.listdir(f"/proc/{self.pid}/task"), key=int)
            except OSError:
                break
            for tid in tids:
                stat = read(f"/proc/{self.pid}/task/{tid}/stat")
                if not stat:
                    continue
                rest = stat[stat.rindex(")") + 2:].split()
                state, minflt, majflt, utime, stime = rest[0], int(rest[7]), int(rest[9]), int(rest[11]), int(rest[12])
                du, ds = (utime - last.get(tid, (utime, stime))[0], stime - last.get(tid, (utime, stime))[1])
                last[tid] = (utime, stime)
                if state == "S" and not du and not ds:
                    continue
                entry = {"tid": int(tid), "comm": read(f"/proc/{self.pid}/task/{tid}/comm").strip(), "state": state,
                         "user_ms": du * 1000 // hz, "sys_ms": ds * 1000 // hz, "minflt": minflt, "majflt": majflt,
                         "wchan": read(f"/proc/{self.pid}/task/{tid}/wchan").strip()}
                stack = [re.sub(r"\+0x.*", "", line.split("] ", 1)[-1]) for line in
                         read(f"/proc/{self.pid}/task/{tid}/stack").splitlines()[:4]]
                if stack:
                    entry["kstack"] = stack
                row["threads"].append(entry)
            rollup = read(f"/proc/{self.pid}/smaps_rollup")
            for key in ("Rss", "AnonHugePages"):
                m = re.search(rf"^{key}:\s+(\d+) kB", rollup, re.M)
                if m:
                    row[key.lower() + "_mib"] = int(m[1]) >> 10
            vm = vmstat()
            row["vmstat_delta"] = {k: vm[k] - vm0.get(k, 0) for k in vm if vm[k] != vm0.get(k, 0)}
            vm0 = vm
            self.rows.append(row)


def trace_of(path: Path) -> list[list[int]]:
    blocks = [b for b in read(str(path)).split("--\n") if b.strip()]
    return [[int(x) for x in line.split()] for line in blocks[-1].splitlines()] if blocks else []


def dmon(seconds: int) -> subprocess.Popen:
    if NO_GPU:
        return subprocess.Popen(["true"], stdout=subprocess.PIPE, text=True)
    return subprocess.Popen(["nvidia-smi", "dmon", "-s", "put", "-d", "1", "-c", str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def one_round(args, gc, gb_size: float) -> dict:
    row: dict = {"gb": gb_size, "thp": read("/sys/kernel/mm/transparent_hugepage/enabled").strip()}
    work = args.staging / f"job-{gb_size}"
    img = args.staging / "img"
    trace = work / "trace"
    os.environ["SLURM_MM_BENCH_TRACE"] = str(trace)
    job = gb.GpuJob(work, gb_size, "random")
    try:
        row["typ_iter_us"] = (job.field("typ_gap_ns") or 0) // 1000
        ck = gb.checkpoint_tree(job.pid, img, leave_running=False, gpu=gc, criu=gb.CRIU)
        row["checkpoint_timings"] = ck.timings
        job.kill()
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        mon = dmon(60)
        t_restore = time.monotonic_ns()
        tree = gb.restore_tree(img, gpu=gc, criu=gb.CRIU)
        t_restored = time.monotonic_ns()
        job.adopt(tree.init_pid)
        sampler = Sampler(tree.init_pid)
        sampler.start()
        running = job.iterating(timeout=90)
        t_iter = time.monotonic_ns()
        time.sleep(1.0)
        sampler.done.set()
        sampler.join(5)
        row.update(restore_timings=tree.timings, restore_tree_s=(t_restored - t_restore) / 1e9,
                   until_iterating_s=(t_iter - t_restored) / 1e9, iterating=running)
        # The app's own view: times relative to the end of restore_tree (ns -> s).
        row["trace"] = [{"iter": i, "start": round((a - t_restored) / 1e9, 3), "launched": round((b - t_restored) / 1e9, 3),
                         "synced": round((c - t_restored) / 1e9, 3)} for i, a, b, c in trace_of(trace)]
        row["samples"] = sampler.rows
        row["data_ok"] = job.data_ok()
        mon.terminate()
        row["dmon"] = mon.communicate(timeout=10)[0].splitlines()[:70]
        say(f"round {gb_size} GB:", json.dumps({k: v for k, v in row.items() if k not in ("samples", "dmon")},
                                               default=str))
        say("dmon:", "\n".join(row["dmon"][:45]))
        busy = [(s["t"], [(t["comm"], t["state"], t["user_ms"], t["sys_ms"], t.get("kstack", [])[:2])
                          for t in s["threads"] if t["user_ms"] or t["sys_ms"]]) for s in sampler.rows]
        say("busy threads every 100 ms (first 60):", json.dumps(busy[:60]))
        say("vmstat deltas:", json.dumps([(s["t"], s["vmstat_delta"], s.get("rss_mib"), s.get("anonhugepages_mib"))
                                          for s in sampler.rows][:60]))
    finally:
        job.kill()
        subprocess.run(["rm", "-rf", str(img)])
    return row


class NoDriverRestore:
    """A GPU checkpointer whose resume does nothing: CRIU alone brings the job back, as
    the step tasks' restore did when it was given no GPU inventory."""

    def resume(self, pids, **kw):
        return []

    def suspend(self, pids):
        return []


def unrestored(args, gc, gb_size: float) -> dict:
    row: dict = {"gb": gb_size}
    os.environ.pop("SLURM_MM_BENCH_TRACE", None)
    work = args.staging / "job-unrestored"
    img = args.staging / "img-unrestored"
    job = gb.GpuJob(work, gb_size, "random")
    try:
        gb.checkpoint_tree(job.pid, img, leave_running=False, gpu=gc, criu=gb.CRIU)
        job.kill()
        tree = gb.restore_tree(img, gpu=NoDriverRestore(), criu=gb.CRIU)
        job.adopt(tree.init_pid)
        pids = [tree.init_pid]
        row["cuda_state_after_criu_restore"] = str(gc.state(tree.init_pid)) if gc else None
        row["progress_in_15s_without_driver_restore"] = job.iterating(timeout=15)
        row["thread_states"] = [read(f"/proc/{tree.init_pid}/task/{t}/stat").split(") ")[-1][:1]
                                for t in os.listdir(f"/proc/{tree.init_pid}/task")]
        t = time.monotonic()
        row["late_driver_restore"] = gc.resume(pids) if gc else None
        row["late_driver_restore_s"] = round(time.monotonic() - t, 2)
        row["progress_after_late_restore"] = job.iterating(timeout=60)
        row["data_ok"] = job.data_ok()
        say("unrestored:", json.dumps(row, default=str))
    finally:
        job.kill()
        subprocess.run(["rm", "-rf", str(img)])
    return row


def main() -> int:
    args = parse()
    global NO_GPU
    NO_GPU = args.no_gpu
    gb.args = argparse.Namespace(no_gpu=args.no_gpu, shared=args.staging, staging=args.staging)
    gb.become_subreaper()
    gc = None if args.no_gpu else gb.GpuCheckpointer.open()
    if gc is None and not args.no_gpu:
        print("gpu_first_step: needs the CUDA checkpoint API", file=sys.stderr)
        return 2
    subprocess.run(["rm", "-rf", str(args.staging)])
    args.staging.mkdir(parents=True, mode=0o711)
    results: dict = {"machine": gb.machine(), "rounds": []}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))
    try:
        if args.unrestored_gb:
            results["unrestored"] = unrestored(args, gc, args.unrestored_gb)
            save()
        for size in [float(x) for x in args.rounds.split(",") if x]:
            if time.monotonic() - T0 > args.deadline:
                say(f"round {size} GB not started: past the deadline")
                break
            results["rounds"].append(one_round(args, gc, size))
            save()
    finally:
        save()
        subprocess.run(["rm", "-rf", str(args.staging)])
    return 0


T0 = time.monotonic()
NO_GPU = False

if __name__ == "__main__":
    sys.exit(main())
