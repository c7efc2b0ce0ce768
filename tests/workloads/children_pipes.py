"""Child processes and pipes: a token goes round a ring parent -> c1 -> c2 -> c3 -> parent.

Each process adds 1 and checks it got exactly what it expected (the previous value it
saw + ring size): a lost, repeated or corrupted token fails it. At GO the parent sends
a stop token; every child forwards it and exits 0 if it saw no error; the parent reaps
them and checks their exit codes and that they are still its children.
"""

import os
import struct
import time

import wl_common

RING = 4  # parent + 3 children
STOP = 2**63 - 1
pipes = [os.pipe() for _ in range(RING)]  # pipes[i]: written by member i, read by i+1
parent = os.getpid()
kids = []


def member(i: int) -> int:
    rd = pipes[(i - 1) % RING][0]
    wr = pipes[i][1]
    last, errors = None, 0
    while True:
        data = os.read(rd, 8)
        if len(data) != 8:
            return 1
        (v,) = struct.unpack("q", data)
        if v == STOP:
            os.write(wr, data)
            return 1 if errors or os.getppid() != parent else 0
        if last is not None and v != last + RING:
            errors += 1
        last = v
        os.write(wr, struct.pack("q", v + 1))


for i in range(1, RING):
    pid = os.fork()
    if pid == 0:
        os._exit(member(i))
    kids.append(pid)

rd, wr = pipes[RING - 1][0], pipes[0][1]
rounds, errors, token = 0, 0, 0
os.write(wr, struct.pack("q", token))
wl_common.ready(f"ring of {RING}")
while not wl_common.go_given():
    (v,) = struct.unpack("q", os.read(rd, 8))
    if v != token + RING - 1:
        errors += 1
    token = v + 1
    rounds += 1
    os.write(wr, struct.pack("q", token))
    time.sleep(0.002)
(v,) = struct.unpack("q", os.read(rd, 8))  # the token in flight
os.write(wr, struct.pack("q", STOP))
(v,) = struct.unpack("q", os.read(rd, 8))
codes = [os.waitstatus_to_exitcode(os.waitpid(k, 0)[1]) for k in kids]
ok = errors == 0 and v == STOP and codes == [0] * (RING - 1) and rounds > 0
wl_common.verdict(ok, f"{rounds} rounds, {errors} sequence errors, children exited {codes}")
