"""Finding: root CRIU re-binds a restored unix socket by its path (unlink of a stale
socket there, bind, chown and chmod following links). The path is the job owner's: a
directory swapped for a symlink after every check and before CRIU reaches it had root
unlink a service's socket in a root-only directory and bind one there, owned by the
user. CRIU's socket path operations now run with the owner's filesystem credentials
(libmm_unixsk.so): what the owner could not do there fails, and so does the restore.

Real CRIU and a real process of an unprivileged user; the swap is done between the
image and restore_tree(), i.e. after any check before CRIU, as a user who won that
race would have it."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from engine_fixtures import USER, engine_env, workload  # noqa: F401
from slurm_mm.errors import ImageRefused, RestoreFailed


@pytest.fixture()
def root_dirs(engine_env):  # noqa: F811
    """Two root-only directories: one holding a root service's listening socket, one empty."""
    service, empty = engine_env.base / "root-service", engine_env.base / "root-empty"
    for d in (service, empty):
        d.mkdir(mode=0o700)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(service / "s"))
    sock.listen(1)
    yield service, empty
    sock.close()


def test_criu_binds_a_restored_socket_only_where_its_owner_could(workload, tmp_path, root_dirs):  # noqa: F811
    service, empty = root_dirs
    w = workload("unix_listener.py")
    a, b = w.dir / "a", w.dir / "b"
    w.args = [str(a / "s"), str(b / "s")]
    w.start()
    w.checkpoint(tmp_path / "img", leave_running=False)
    assert w.tree.wait(10) == 137
    before = os.lstat(service / "s")
    swap = f"mv {a} {a}.orig && ln -s {service} {a} && mv {b} {b}.orig && ln -s {empty} {b}"
    subprocess.run(["runuser", "-u", USER, "--", "sh", "-c", swap], check=True)
    with pytest.raises((RestoreFailed, ImageRefused)):
        w.restore(tmp_path / "img")
    after = os.lstat(service / "s")
    assert (after.st_ino, after.st_uid) == (before.st_ino, 0) and stat.S_ISSOCK(after.st_mode), \
        "root CRIU unlinked a root service's socket and bound the job's in its place"
    assert os.listdir(empty) == [], "root CRIU created the job's socket in a root-only directory"


def test_a_restored_socket_is_bound_again_as_its_owner(workload, tmp_path):  # noqa: F811
    """The same restore without a swap: both sockets come back at their paths, the job's
    own, and accept connections."""
    w = workload("unix_listener.py")
    paths = [w.dir / "a" / "s", w.dir / "b" / "s"]
    w.args = [str(p) for p in paths]
    w.start()
    w.checkpoint(tmp_path / "img", leave_running=False)
    assert w.tree.wait(10) == 137
    restored = w.restore(tmp_path / "img")
    for p in paths:
        st = os.lstat(p)
        assert stat.S_ISSOCK(st.st_mode) and st.st_uid == w.env.user.pw_uid, p
    w.go()
    assert restored.wait(30) == 0
    assert "PASS: 2 sockets listen at their paths" in w.text("restored.log"), w.text("restored.log")
