#!/usr/bin/env python3
"""A self-checking demo workload: a hash chain of N steps, printed as it goes.

It prints `fresh start` once when its process starts (a restored process resumes
mid-loop and never prints it again), a line with the chain's state every 10 steps, and
`result=<hex> steps=<N>`. Every line depends on every earlier step having run exactly
once in order, so a job that was checkpointed, killed and restored prints exactly the
lines of an uninterrupted run only if no work was lost or repeated. `--fast` skips the
pacing sleep (used to compute the uninterrupted run's output).
"""
import hashlib
import sys
import time

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 600
fast = "--fast" in sys.argv
print("fresh start", flush=True)
state = hashlib.sha256(b"slurm_mm demo").digest()
for step in range(1, steps + 1):
    state = hashlib.sha256(state + step.to_bytes(8, "little")).digest()
    if step % 10 == 0:
        print(f"step {step}/{steps} {state.hex()[:16]}", flush=True)
    if not fast:
        time.sleep(0.1)
print(f"result={state.hex()} steps={steps}", flush=True)
