"""A CUDA job that proves its own continuity across GPU checkpoint/restore (zdtm-style).

It fills `--gb` GB of GPU memory with a known pattern (element i = i XOR SEED) and then
loops: each step adds 1 to a counter tensor on the GPU and to a counter on the CPU.
Every second it writes a heartbeat to its status file (JSON, atomic rename); on SIGUSR1
it re-checks every element of the pattern and that the GPU counter equals the CPU
counter, and writes the verdict (`verify_seq`, `data_ok`). If the GPU state were lost,
corrupted or rolled back, the verdict says so; the harness only reads the verdict.

`--child-gb N` also starts a second CUDA process (this script) and a plain `sleep`, so
the tree has a non-CUDA process too. SIGTERM ends the tree.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

SEED = 0x5DEECE66D
CHUNK = 1 << 27  # elements per verification chunk (1 GiB of int64)


def write_status(path: str, status: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(status, handle)
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, required=True)
    parser.add_argument("--status", required=True)
    parser.add_argument("--child-gb", type=float, default=0.0)
    args = parser.parse_args()

    children: list[subprocess.Popen] = []
    if args.child_gb > 0:
        children.append(
            subprocess.Popen([sys.executable, __file__, "--gb", str(args.child_gb), "--status", args.status + ".child"])
        )
        # A plain process; it ignores the SIGUSR1 that mm-init forwards to the whole group.
        children.append(subprocess.Popen(["sh", "-c", 'trap "" USR1; exec sleep 100000']))

    import torch  # after the fork of children: they are exec'd, but keep it clean

    verify_requested = False
    stop = False

    def on_usr1(signum, frame):
        nonlocal verify_requested
        verify_requested = True
        for child in children:
            if child.poll() is None and child.args[0] == sys.executable:
                child.send_signal(signal.SIGUSR1)

    def on_term(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGTERM, on_term)

    n = int(args.gb * (1 << 30)) // 8
    started = time.monotonic()
    data = torch.empty(n, dtype=torch.int64, device="cuda")
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        torch.arange(lo, hi, dtype=torch.int64, device="cuda", out=data[lo:hi])
        data[lo:hi].bitwise_xor_(SEED)
    counter = torch.zeros(1, dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    fill_s = time.monotonic() - started

    iters = 0
    verify_seq = 0
    verdict: dict = {}
    last_beat = 0.0
    status = {
        "pid": os.getpid(),
        "children": [c.pid for c in children],
        "gb": args.gb,
        "fill_s": round(fill_s, 2),
    }
    while not stop:
        counter += 1
        iters += 1
        if verify_requested:
            verify_requested = False
            t0 = time.monotonic()
            bad = 0
            for lo in range(0, n, CHUNK):
                hi = min(n, lo + CHUNK)
                want = torch.arange(lo, hi, dtype=torch.int64, device="cuda").bitwise_xor_(SEED)
                bad += int((data[lo:hi] != want).sum().item())
                del want
            gpu_count = int(counter.item())
            verify_seq += 1
            verdict = {
                "verify_seq": verify_seq,
                "bad_elements": bad,
                "gpu_counter": gpu_count,
                "cpu_counter": iters,
                "data_ok": bad == 0 and gpu_count == iters,
                "verify_s": round(time.monotonic() - t0, 2),
            }
            last_beat = 0.0
        now = time.monotonic()
        if now - last_beat >= 1.0:
            torch.cuda.synchronize()
            write_status(args.status, {**status, **verdict, "iters": iters, "time": time.time()})
            last_beat = now
        time.sleep(0.02)
    for child in children:
        child.terminate()
    for child in children:
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
