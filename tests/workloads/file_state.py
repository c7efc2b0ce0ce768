"""A workload that depends on its files (zdtm style): it judges its own state.

    file_state.py local DIR [fd-only]   a node-local working file in DIR, read half before the image
    file_state.py writer        a log opened with a plain truncating open(..., "w")
    file_state.py intermediate  a file written, reopened read-only, deleted after the image
    file_state.py reader        an input file held open read-only
    file_state.py rewriter [mmap]  a counter rewritten in place (O_RDWR, or a shared mapping)
    file_state.py scratch DIR   works in node-local DIR: files written and closed before the image,
                                read in a later step (as a script's `app1 > a; app2 a`)

Prints READY once set up; where the harness lets the world move on after the image it
waits for STEP1, makes its progress, prints MOVED; then waits for GO, checks that what it
sees is what a run without interruption would see, and prints PASS or FAIL.
"""

import os
import sys
import time

LINES = 50
BLOCK = bytes(range(256)) * 4096  # 1 MiB of a known pattern


def wait(name: str) -> None:
    while not os.path.exists(name):
        time.sleep(0.02)


def say(word: str) -> None:
    print(word, flush=True)


def verdict(ok: bool, why: str = "") -> int:
    say("PASS" if ok else f"FAIL {why}")
    return 0 if ok else 1


def local(directory: str, fd_only: bool = False) -> int:
    path = os.path.join(directory, "work.dat")
    with open(path, "wb") as f:
        f.write(BLOCK)
    f = open(path, "rb")
    first = f.read(len(BLOCK) // 2)
    say("READY")
    wait("GO")
    rest = f.read()
    if fd_only:  # like bash reading its script: only the open fd matters
        return verdict(first + rest == BLOCK, f"{len(first)}+{len(rest)}")
    with open(path, "rb") as again:  # the path itself is back, not only the fd
        whole = again.read()
    return verdict(first + rest == BLOCK and whole == BLOCK, f"{len(first)}+{len(rest)} {len(whole)}")


def scratch(directory: str) -> int:
    home = os.getcwd()  # where the harness puts GO
    os.chdir(directory)
    os.makedirs("stage", exist_ok=True)
    with open("stage/a.out", "wb") as f:
        f.write(BLOCK)
    with open("b.txt", "w") as f:
        f.write("stage two\n")
    say("READY")
    wait(os.path.join(home, "GO"))
    with open("stage/a.out", "rb") as f:
        a = f.read()
    with open("b.txt") as f:
        b = f.read()
    return verdict(a == BLOCK and b == "stage two\n", f"{len(a)} bytes, {b!r}")


def writer() -> int:
    log = open("log.txt", "w")
    for i in range(1, LINES + 1):
        log.write(f"{i}\n")
    log.flush()
    say("READY")
    wait("STEP1")
    for i in range(LINES + 1, 2 * LINES + 1):
        log.write(f"{i}\n")
    log.flush()
    say("MOVED")
    wait("GO")
    for i in range(2 * LINES + 1, 3 * LINES + 1):
        log.write(f"{i}\n")
    log.close()
    with open("log.txt") as f:
        got = f.read()
    return verdict(got == "".join(f"{i}\n" for i in range(1, 3 * LINES + 1)), repr(got[:80]))


def intermediate() -> int:
    with open("inter.dat", "wb") as f:
        f.write(BLOCK)
    f = open("inter.dat", "rb")
    say("READY")
    wait("STEP1")
    os.unlink("inter.dat")
    say("MOVED")
    wait("GO")
    return verdict(f.read() == BLOCK, "intermediate content differs")


def reader() -> int:
    f = open("input.dat", "rb")
    say("READY")
    wait("GO")
    return verdict(f.read() == BLOCK, "input changed under the job")


def rewriter(use_mmap: bool) -> int:
    """Its counter in memory and in the file must agree at every step."""
    import mmap

    f = open("data.bin", "w+b")
    f.write(b"%08d" % 1 + b"\0" * 4088)
    f.flush()
    view = mmap.mmap(f.fileno(), 4096) if use_mmap else None
    count = 1

    def read() -> int:
        if view is not None:
            return int(view[:8])
        f.seek(0)
        return int(f.read(8))

    def write(value: int) -> None:
        if view is not None:
            view[:8] = b"%08d" % value
            view.flush()
        else:
            f.seek(0)
            f.write(b"%08d" % value)
            f.flush()

    say("READY")
    wait("STEP1")
    ok = read() == count
    count += 1
    write(count)
    say("MOVED")
    wait("GO")
    return verdict(ok and read() == count, f"file says {read()}, memory {count}")


def main() -> int:
    mode = sys.argv[1]
    if mode == "local":
        return local(sys.argv[2], sys.argv[3:] == ["fd-only"])
    if mode == "scratch":
        return scratch(sys.argv[2])
    if mode == "rewriter":
        return rewriter(sys.argv[2:] == ["mmap"])
    if mode == "reader":
        with open("input.dat", "wb") as f:
            f.write(BLOCK)
    return {"writer": writer, "intermediate": intermediate, "reader": reader}[mode]()


if __name__ == "__main__":
    sys.exit(main())
