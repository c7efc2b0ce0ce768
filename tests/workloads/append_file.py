"""Open files: one written in append mode, one read sequentially from a kept offset.

append.log gets a sequence number per line (O_APPEND, opened once); data.bin (1 MiB of
known bytes) is read 4 KiB at a time from where the last read stopped. At GO: append.log
must hold exactly 1..n, and every chunk read (before and after restore) must have been
what the file holds at that offset.
"""

import hashlib
import os

import wl_common

CHUNK = 4096
data = b"".join(hashlib.sha256(i.to_bytes(4, "little")).digest() for i in range(32768))  # 1 MiB
with open("data.bin", "wb") as f:
    f.write(data)
reader = os.open("data.bin", os.O_RDONLY)
log = os.open("append.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
n = bad_reads = reads = 0


def work() -> None:
    global n, bad_reads, reads
    n += 1
    os.write(log, f"{n}\n".encode())
    pos = os.lseek(reader, 0, os.SEEK_CUR)
    chunk = os.read(reader, CHUNK)
    if not chunk:
        os.lseek(reader, 0, os.SEEK_SET)
        return
    reads += 1
    if chunk != data[pos : pos + len(chunk)]:
        bad_reads += 1


for _ in range(10):
    work()
wl_common.ready()
wl_common.wait_go(0.005, work)
os.close(log)
with open("append.log") as f:
    lines = [int(x) for x in f]
ok = lines == list(range(1, n + 1)) and bad_reads == 0
wl_common.verdict(ok, f"{n} appended lines ({len(lines)} in file), {reads} reads, {bad_reads} wrong")
