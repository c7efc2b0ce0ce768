"""The GPU job targets, end to end through the store, with the floor of every stage.

    python3 benchmarks/gpu_targets.py --gb 13 --out $OUT/gpu_targets.json [--thp always,madvise]

as root on the GPU machine (same needs as gpu_bench.py). One round per THP mode: a job
holding --gb GB of random data on the GPU (gpu_workload.py) is
  1. checkpointed with the job left running (engine.checkpoint_tree into tmpfs staging:
     GPU checkpoint -> criu dump -> GPU restore): "freeze" is the longest stall the app
     itself logged (goal <= 10 s);
  2. committed at once (trigger preempt: normal priority, as a preemption would):
     "durable" is checkpoint start -> commit returned (goal <= 20 s);
  3. killed; caches dropped; extracted from the store into tmpfs and restored
     (engine.restore_tree: criu restore + GPU restore) until the app iterates again:
     "restore" (goal <= 12 s); then the app checks every element of its GPU data.
Raw tools in the same round give the floors: `dd conv=fsync` of the staged image's bytes
to the store's filesystem (the disk's write floor of "durable"), a cold `cat` of the
stored image (the read floor of "restore"); the GPU checkpoint/restore and CRIU stages
are the driver's and CRIU's own times inside the engine (the engine adds < 15% to them,
see gpu_bench.py's overhead step).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import gpu_bench as gb  # noqa: E402  (finds CRIU, the wheels, the workload)

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=13.0)
    p.add_argument("--thp", default="", help="THP modes to run one round each in (default: as set)")
    p.add_argument("--read-back", default="device", help="the store's read_back mode")
    p.add_argument("--shared", type=Path, default=Path("/var/tmp/slurm_mm-gpu-targets"))
    p.add_argument("--staging", type=Path, default=Path("/dev/shm/slurm_mm-gpu-targets"))
    p.add_argument("--out", type=Path, default=HERE / "out" / "gpu_targets.json")
    p.add_argument("--deadline", type=float, default=540.0, help="no new round after this many seconds")
    p.add_argument("--warm-libs", action="store_true",
                   help="after dropping caches, read the job's mapped files back before the restore (timed)")
    p.add_argument("--no-gpu", action="store_true", help="smoke-test the harness without a GPU (job on the CPU)")
    return p.parse_args()


def say(*parts) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s]", *parts, flush=True)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def tool(argv: list[str]) -> float:
    t = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t


def files_of(d: Path) -> list[Path]:
    return sorted((p for p in d.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size, reverse=True)


def wait_iterating(job, timeout: float) -> tuple[bool, list[str]]:
    """Wait until the restored app counts an iteration again; meanwhile note every change
    of what its threads are doing (state and kernel wait channel, from /proc) with the
    time since the wait began, to tell where a slow first iteration goes. The killed
    original's stats file was removed: the restored app's first iteration writes a new one
    (its gap exceeds the stall threshold). Comparing with the original's last count instead
    waited for the restored app to redo every iteration the original ran after its
    checkpoint (during the commit and the dd): the 24-33 s "first step" of earlier rounds."""
    t0 = time.monotonic()
    seen: list[str] = []
    last = ""
    while time.monotonic() - t0 < timeout:
        if job.stats() is not None:
            return True, seen
        now = []
        try:
            for tid in sorted(os.listdir(f"/proc/{job.pid}/task"), key=int):
                stat = Path(f"/proc/{job.pid}/task/{tid}/stat").read_text()
                state = stat[stat.rindex(")") + 2]
                wchan = Path(f"/proc/{job.pid}/task/{tid}/wchan").read_text().strip() or "-"
                if state != "S" or wchan not in ("-", "0"):
                    now.append(f"{tid}:{state}:{wchan}")
        except (OSError, ValueError):
            now = ["gone"]
        text = " ".join(now[:6])
        if text != last:
            seen.append(f"{time.monotonic() - t0:.2f}s {text}")
            last = text
        time.sleep(0.05)
    return False, seen[-40:]


def mapped_files(pid: int) -> list[Path]:
    """The regular files mapped by a process (its executable and libraries)."""
    paths = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/") and not parts[5].startswith(("/dev/", "/proc/")):
            p = Path(parts[5].removesuffix(" (deleted)"))
            if p.is_file():
                paths.add(p)
    return sorted(paths)


def one_round(args, gc, thp: str | None) -> dict:
    if thp:
        THP.write_text(thp + "\n")
    row: dict = {"gb": args.gb, "thp": THP.read_text().strip(), "read_back": args.read_back,
                 "warm_libs": args.warm_libs}
    store = gb.ImageStore(args.shared / "store", level=1, threads=0, keep=1, read_back=args.read_back)
    jid = "targets"
    store.remove_job(jid)
    store.prepare_job(jid, 0, 0)
    img = args.staging / "ckpt"
    dest = args.staging / "restored"
    job = gb.GpuJob(args.staging / "job", args.gb, "random")
    try:
        t0 = time.monotonic_ns()
        ck = gb.checkpoint_tree(job.pid, img, leave_running=True, gpu=gc, criu=gb.CRIU)
        t1 = time.monotonic_ns()
        image = store.commit(jid, img, epoch=0, uid=0, gid=0, node=os.uname().nodename, trigger="preempt",
                             criu_version=gb.CRIU.version())
        t2 = time.monotonic_ns()
        row.update(freeze_s=job.felt(t0, t1), checkpoint_s=(t1 - t0) / 1e9, commit_s=(t2 - t1) / 1e9,
                   durable_s=(t2 - t0) / 1e9, checkpoint_timings=ck.timings, image_bytes=ck.image_bytes,
                   stored_bytes=image.manifest.stored_size)
        say("checkpoint:", json.dumps(row, default=str))
        big = files_of(img)[0]
        row["dd_bytes"] = big.stat().st_size
        drop_caches()
        out = args.shared / "dd.out"
        row["dd_fsync_s"] = tool(["dd", f"if={big}", f"of={out}", "bs=8M", "conv=fsync"])
        out.unlink()
        shutil.rmtree(img)
        libs = mapped_files(job.pid)
        job.kill()
        job.stats_path.unlink(missing_ok=True)
        drop_caches()
        # The job's programs and libraries (PyTorch: GBs, here on a compressed squashfs)
        # are read back on first touch after a restore; a cold read of them is their floor.
        # With --warm-libs they are read now, as on a node that already ran such jobs.
        row["lib_bytes"] = sum(p.stat().st_size for p in libs)
        if args.warm_libs:
            row["lib_cold_read_s"] = tool(["cat", *map(str, libs)])
        r0 = time.monotonic()
        store.extract(image, dest)
        r1 = time.monotonic()
        tree = gb.restore_tree(dest, gpu=gc, criu=gb.CRIU)
        r2 = time.monotonic()
        job.adopt(tree.init_pid)
        running, waits = wait_iterating(job, timeout=90)
        r3 = time.monotonic()
        row.update(extract_s=r1 - r0, restore_tree_s=r2 - r1, restore_s=r3 - r0, iterating=running,
                   restore_timings=tree.timings, until_iterating_s=r3 - r2, waiting_in=waits)
        row["data_ok"] = job.data_ok()
        stored = files_of(image.path)[0]
        row["stored_file_bytes"] = stored.stat().st_size
        drop_caches()
        row["cat_cold_s"] = tool(["cat", str(stored)])
        say("restore:", json.dumps(row, default=str))
    finally:
        job.kill()
        store.remove_job(jid)
        shutil.rmtree(img, ignore_errors=True)
        shutil.rmtree(dest, ignore_errors=True)
    return row


def main() -> int:
    args = parse()
    gb.args = argparse.Namespace(no_gpu=args.no_gpu, shared=args.shared, staging=args.staging)  # gpu_bench's globals
    gb.become_subreaper()
    gc = None if args.no_gpu else gb.GpuCheckpointer.open()
    if (gc is None and not args.no_gpu) or gb.ImageStore is None:
        print("gpu_targets: needs the CUDA checkpoint API and the store's libraries", file=sys.stderr)
        return 2
    for d in (args.shared, args.staging):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True, mode=0o711)
    before = THP.read_text().strip()
    results = {"machine": gb.machine(), "rounds": []}
    try:
        for thp in [t for t in args.thp.split(",") if t] or [None]:
            if time.monotonic() - T0 > args.deadline:
                say(f"round thp={thp} not started: past the deadline")
                break
            results["rounds"].append(one_round(args, gc, thp))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1, default=str))
    finally:
        THP.write_text(before[before.index("[") + 1:before.index("]")] + "\n")
        for d in (args.shared, args.staging):
            shutil.rmtree(d, ignore_errors=True)
    return 0


T0 = time.monotonic()

if __name__ == "__main__":
    sys.exit(main())
