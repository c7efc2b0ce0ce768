#!/usr/bin/env python3
"""Self-checking Slurm job: a hash chain of STEPS steps, one every DELAY seconds.

    chain_job.py STEPS DELAY LOG [EXIT_CODE]

Each step appends its number to LOG (opened O_WRONLY|O_APPEND, as CRIU needs for files
that keep growing). At the end it prints `result=<hex> steps=<n> pid=<ns pid>` and
exits with EXIT_CODE. The result depends on every step having run exactly once, in
order, in this process's memory: a restored job prints the uninterrupted run's result
only if its memory state came back intact. LOG shows where a restore resumed.
"""
import hashlib
import os
import sys
import time


def chain(steps: int) -> str:
    state = hashlib.sha256(b"slurm_mm chain").digest()
    for step in range(1, steps + 1):
        state = hashlib.sha256(state + step.to_bytes(8, "little")).digest()
    return state.hex()


def main() -> int:
    steps, delay, log = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    code = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    state = hashlib.sha256(b"slurm_mm chain").digest()
    for step in range(1, steps + 1):
        state = hashlib.sha256(state + step.to_bytes(8, "little")).digest()
        os.write(fd, f"{step}\n".encode())
        time.sleep(delay)
    print(f"result={state.hex()} steps={steps} pid={os.getpid()}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
