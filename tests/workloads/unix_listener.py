"""Listens on unix sockets bound at the paths given (their directories are made here).

At GO each path must still be its socket: a connection to it reaches this process.
"""

import os
import socket
import sys

import wl_common

listeners = []
for path in sys.argv[1:]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen(4)
    listeners.append((path, s))
wl_common.ready()
wl_common.wait_go()
for path, s in listeners:
    c = socket.socket(socket.AF_UNIX)
    c.connect(path)
    s.accept()[0].close()
    c.close()
wl_common.verdict(True, f"{len(listeners)} sockets listen at their paths")
