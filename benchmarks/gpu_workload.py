"""The GPU benchmark workload: a CUDA job that measures, itself, what a checkpoint costs it.

    python3 gpu_workload.py --gb G --stats FILE [--content random|pattern] [--host-gb H]

Holds G GB of GPU memory (random int64 by default, like trained weights: incompressible;
`pattern` is i XOR seed, which zstd packs well) and H GB of host memory, then loops: each
iteration runs a small kernel on a slice of the data and synchronises. While the CUDA
checkpoint API holds the process locked its CUDA calls block, and while CRIU has it
frozen nothing runs: both show up as a stall between two iterations. Like bench-app
(workload.c) it logs every stall longer than 5x its typical iteration (and > 2 ms) with
CLOCK_MONOTONIC end times, and writes the same text stats format (app.read_stats reads it)
every 50 ms, by rename: no file stays open across a dump. SIGUSR1 asks it to check its
data (sum of the GPU tensor vs the sum taken at start) and write `data_ok 1` (intact)
or `data_ok 2` (changed), and counts `checks`.
With SLURM_MM_BENCH_TRACE=FILE set, each iteration's start, launch-done and sync-done
times (CLOCK_MONOTONIC ns) are kept for the last few iterations; after a stall of more
than a second (a restore) they and those of the next 20 iterations go to FILE, to tell
where a slow first iteration goes (host-side launch or waiting for the GPU).
"""

from __future__ import annotations

import argparse
import os
import signal
import time

MAX_STALLS = 200


def write(path: str, fields: dict[str, int], stalls: list[tuple[int, int]]) -> None:
    text = "".join(f"{k} {v}\n" for k, v in fields.items())
    text += "".join(f"{end} {gap}\n" for end, gap in stalls[-MAX_STALLS:])
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--gb", type=float, required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--content", choices=("random", "pattern"), default="random")
    p.add_argument("--host-gb", type=float, default=0.0)
    p.add_argument("--device", default="cuda", help="cpu: a harness smoke test without a GPU")
    args = p.parse_args()

    import torch

    n = int(args.gb * 1e9) // 8
    chunk = 1 << 27
    data = torch.empty(n, dtype=torch.int64, device=args.device)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        if args.content == "random":
            data[lo:hi].random_()
        else:
            torch.arange(lo, hi, dtype=torch.int64, device=args.device, out=data[lo:hi]).bitwise_xor_(0x5DEECE66D)
    host = None  # held for the whole run: host memory that CRIU dumps
    if args.host_gb > 0:
        host = torch.randint(0, 1 << 62, (int(args.host_gb * 1e9) // 8,), dtype=torch.int64)
    reference = int(data.sum(dtype=torch.int64).item())
    work = torch.zeros(1 << 20, dtype=torch.float32, device=args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    sync()

    check = {"requested": False}
    signal.signal(signal.SIGUSR1, lambda *_: check.__setitem__("requested", True))

    trace_path = os.environ.get("SLURM_MM_BENCH_TRACE")
    trace: list[tuple[int, int, int, int]] = []  # (iteration, start, launched, synced)
    trace_left = 0
    stalls: list[tuple[int, int]] = []
    iters, max_gap, typ = 0, 0, 0
    data_ok = 0  # 0: not checked yet, 1: intact, 2: changed
    checks = 0
    prev = time.monotonic_ns()
    last_write = 0
    while True:
        t_start = time.monotonic_ns()
        work.mul_(0.999).add_(1.0)
        t_launched = time.monotonic_ns()
        sync()
        iters += 1
        now = time.monotonic_ns()
        if trace_path:
            trace.append((iters, t_start, t_launched, now))
            if trace_left == 0:
                del trace[:-5]
            if now - prev > 1_000_000_000 and trace_left == 0:
                trace_left = 20
            elif trace_left:
                trace_left -= 1
                if trace_left == 0:
                    with open(trace_path, "a") as f:
                        f.write("".join(f"{i} {a} {b} {c}\n" for i, a, b, c in trace) + "--\n")
        gap = now - prev
        prev = now
        threshold = max(2_000_000, 5 * typ) if iters > 100 else 1 << 62
        if gap > threshold:
            stalls.append((now, gap))
            del stalls[:-MAX_STALLS]
        else:
            typ = gap if typ == 0 else (typ * 63 + gap) // 64
        max_gap = max(max_gap, gap) if iters > 100 else 0
        if check["requested"]:  # the check's own time is not a stall
            check["requested"] = False
            data_ok = 1 if int(data.sum(dtype=torch.int64).item()) == reference else 2
            checks += 1
            prev = time.monotonic_ns()
        if now - last_write > 50_000_000 or gap > threshold:
            write(args.stats, {"pid": os.getpid(), "iters": iters, "now_ns": now, "work_us": typ // 1000,
                               "mem_mib": int(args.gb * 1e9) >> 20, "max_gap_ns": max_gap, "typ_gap_ns": typ,
                               "data_ok": data_ok, "checks": checks, "stalls": len(stalls)}, stalls)
            last_write = now


if __name__ == "__main__":
    raise SystemExit(main())
