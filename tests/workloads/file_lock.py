"""File locks held across checkpoint/restore: an flock() lock and a POSIX (fcntl) lock.

At GO a new child process tries to take both without waiting; it must be refused for
each (the restored process still holds them). The harness may try too.
"""

import fcntl
import os

import wl_common

flock_fd = os.open("flock.lck", os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(flock_fd, fcntl.LOCK_EX)
posix_fd = os.open("posix.lck", os.O_RDWR | os.O_CREAT, 0o644)
fcntl.lockf(posix_fd, fcntl.LOCK_EX)
wl_common.ready()
wl_common.wait_go()


def refused(take) -> bool:
    try:
        take()
    except OSError:
        return True
    return False


child = os.fork()
if child == 0:
    f = os.open("flock.lck", os.O_RDWR)  # a new open file: flock conflicts with ours
    p = os.open("posix.lck", os.O_RDWR)
    a = refused(lambda: fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB))
    b = refused(lambda: fcntl.lockf(p, fcntl.LOCK_EX | fcntl.LOCK_NB))
    os._exit((0 if a else 1) | (0 if b else 2))
code = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
wl_common.verdict(code == 0, f"another process was {'refused both locks' if code == 0 else f'given a lock (code {code})'}")
