"""A producer run as an `srun` step, piped into the batch script's own consumer.

    srun -n1 python3 stream_pair.py produce LINES DELAY | python3 stream_pair.py consume OUT

The producer writes LINES numbered lines (a fixed payload each, DELAY seconds apart in
bursts), so that it is always mid-stream. The consumer checks every line as it comes:
a line missing, repeated or torn (a hole in the stream) ends it with `HOLE ...` in OUT
and exit 3; otherwise OUT gets `lines=N sha256=...`, the same as an uninterrupted run's
(`expected()`). Every 100 lines it rewrites `progress.txt` with the count (a sign of
progress only, not judged).
"""

from __future__ import annotations

import hashlib
import sys
import time


def line(i: int) -> str:
    return f"{i} {hashlib.sha256(str(i).encode()).hexdigest() * 6}\n"


def expected(lines: int) -> str:
    digest = hashlib.sha256()
    for i in range(1, lines + 1):
        digest.update(line(i).encode())
    return f"lines={lines} sha256={digest.hexdigest()}\n"


def produce(lines: int, delay: float) -> None:
    for i in range(1, lines + 1):
        sys.stdout.write(line(i))
        if i % 10 == 0:
            sys.stdout.flush()
            time.sleep(delay)
    sys.stdout.flush()


def consume(out: str) -> int:
    digest, count = hashlib.sha256(), 0
    for text in sys.stdin:
        if text != line(count + 1):
            with open(out, "w") as f:
                f.write(f"HOLE after line {count}: got {text[:40]!r}\n")
            return 3
        count += 1
        digest.update(text.encode())
        if count % 100 == 0:
            with open("progress.txt", "w") as f:
                f.write(f"{count}\n")
    with open(out, "w") as f:
        f.write(f"lines={count} sha256={digest.hexdigest()}\n")
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "produce":
        produce(int(sys.argv[2]), float(sys.argv[3]))
    else:
        sys.exit(consume(sys.argv[2]))
