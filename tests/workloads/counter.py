"""A Python counter that must go on across checkpoint/restore without gap or repeat.

Every few ms it appends the next number to counter.log (O_APPEND, opened once). At GO
it reads counter.log back: it must be exactly 1..n. argv[1]: exit code on PASS.
argv[2] == "io_uring": also hold an io_uring fd (CRIU cannot dump one: dump fails).
"""

import ctypes
import os
import sys

import wl_common

code = int(sys.argv[1]) if len(sys.argv) > 1 else 0
if len(sys.argv) > 2 and sys.argv[2] == "io_uring":
    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(120)
    ring = libc.syscall(425, 4, params)  # io_uring_setup
    if ring < 0:
        wl_common.verdict(False, f"io_uring_setup failed: errno {ctypes.get_errno()}")

fd = os.open("counter.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
n = 0


def tick() -> None:
    global n
    n += 1
    os.write(fd, f"{n}\n".encode())


for _ in range(20):
    tick()
wl_common.ready(f"pid={os.getpid()}")
wl_common.wait_go(0.005, tick)
os.close(fd)
with open("counter.log") as f:
    got = [int(line) for line in f]
ok = got == list(range(1, n + 1))
wl_common.verdict(ok, f"counter reached {n}, log has {len(got)} lines", code)
