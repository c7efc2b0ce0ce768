"""Pure logic of the engine (log excerpts, --inherit-fd keys, metadata) and the prlimit shim."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from engine_fixtures import NATIVE, engine_env, needs_root  # noqa: F401
from slurm_mm.engine import native, owner_check, proctree
from slurm_mm.engine.criu import _headline, external_file_key, log_excerpt
from slurm_mm.engine.restore import _inherit_map, read_metadata
from slurm_mm.errors import CheckpointFailed, ImageCorrupt, RestoreFailed

CRIU_LOG = """\
(00.000010) Version: 4.2.1 (gitid 0)
(00.007814) Warn  (criu/kerndat.c:1642): CRIU was built without libnftables support
(00.044003) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.050000) Dumping pid 9024
(00.076120) Error (criu/cr-dump.c:389): Can't get rlimit 0: Operation not permitted
(00.076125) Error (criu/cr-dump.c:1584): Dump core (pid: 9024) failed with -1
(00.079136) Error (criu/cr-dump.c:1975): Dumping FAILED.
"""


def test_log_excerpt_keeps_errors_and_drops_known_noise(tmp_path):
    log = tmp_path / "dump.log"
    log.write_text(CRIU_LOG)
    excerpt = log_excerpt(log)
    assert "Can't get rlimit 0" in excerpt and "Dumping pid" not in excerpt
    assert "RLIMIT_NOFILE for self" not in excerpt
    assert _headline(excerpt) == "Can't get rlimit 0: Operation not permitted"


def test_log_excerpt_of_a_missing_log_is_empty(tmp_path):
    assert log_excerpt(tmp_path / "nope.log") == ""


def test_checkpoint_failed_prints_one_line_and_keeps_the_log():
    err = CheckpointFailed("criu dump failed:\n  line two", "excerpt\nlines")
    assert "\n" not in str(err) and err.log_excerpt == "excerpt\nlines"


def _meta(stdio):
    return {"stdio": {str(k): v for k, v in stdio.items()}}


def test_new_output_fds_replace_the_recorded_files():
    meta = _meta({
        0: {"target": "/dev/null", "kind": "file", "criu_key": "dev/null"},
        1: {"target": "/j/out", "kind": "file", "criu_key": "j/out"},
        2: {"target": "/j/err", "kind": "file", "criu_key": "j/err"},
    })
    assert _inherit_map(meta, {0: 10, 1: 11, 2: 12}) == {11: "j/out", 12: "j/err"}


def test_one_file_for_stdout_and_stderr_is_inherited_once():
    same = {"target": "/j/out", "kind": "file", "criu_key": "j/out"}
    assert _inherit_map(_meta({1: same, 2: same}), {1: 11, 2: 12}) == {11: "j/out"}


def test_a_file_criu_cannot_take_from_an_fd_is_refused_clearly():
    meta = _meta({1: {"target": "/j/out (deleted)", "kind": "deleted", "criu_key": None}})
    with pytest.raises(RestoreFailed, match="stdout was /j/out"):
        _inherit_map(meta, {1: 11})


def test_files_from_outside_the_mount_namespace_are_all_handed_back():
    """A restored tree with its own mount namespace holds the restorer's fds (external)."""
    out = {"target": "/j/out", "kind": "file", "criu_key": "file[1b:20c0c5]", "external": True}
    null = {"target": "/dev/null", "kind": "file", "criu_key": "file[18:4]", "external": True}
    meta = _meta({0: null, 1: out, 2: out})
    meta["external_files"] = {"file[1b:20c0c5]": "/j/out", "file[18:4]": "/dev/null"}
    assert external_file_key(0x1B, 0x20C0C5) == "file[1b:20c0c5]"
    assert _inherit_map(meta, {0: 10, 1: 11, 2: 12}, devnull=lambda: 99) == {99: "file[18:4]", 11: "file[1b:20c0c5]"}
    with pytest.raises(RestoreFailed, match="pass a new stdout"):
        _inherit_map(meta, {0: None, 1: None, 2: None}, devnull=lambda: 99)


def test_open_file_keys_match_criu_inherit_fd_syntax(tmp_path):
    r, w = os.pipe()
    f = os.open(tmp_path / "x", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        pipe = proctree.open_file(os.getpid(), r)
        assert pipe.kind == "pipe" and pipe.criu_key == f"pipe:[{os.fstat(r).st_ino}]"
        reg = proctree.open_file(os.getpid(), f)
        assert reg.kind == "file" and reg.criu_key == str(tmp_path / "x").lstrip("/")
        assert proctree.open_file(os.getpid(), 987) is None
    finally:
        for fd in (r, w, f):
            os.close(fd)


def test_metadata_missing_or_garbled_is_image_corrupt(tmp_path):
    with pytest.raises(ImageCorrupt):
        read_metadata(tmp_path)
    (tmp_path / "engine.json").write_text("{not json")
    with pytest.raises(ImageCorrupt):
        read_metadata(tmp_path)
    (tmp_path / "engine.json").write_text(json.dumps({"stdio": {}}))
    assert read_metadata(tmp_path) == {"stdio": {}}


def test_wait_gone_returns_the_pids_still_there():
    p = subprocess.Popen(["sleep", "5"])
    try:
        assert proctree.wait_gone([p.pid], 0.1) == [p.pid]
    finally:
        p.kill()
        p.wait()
    assert proctree.wait_gone([p.pid], 2) == []


def test_owner_check_accepts_the_owner_and_flags_everyone_else():
    child = subprocess.Popen(["sleep", "5"])
    try:
        # This (root) process as the "init", its child as a root-owned job process.
        problems, seen = owner_check.problems(os.getpid(), 1002, {1002})
    finally:
        child.kill()
        child.wait()
    assert seen >= 2
    assert any(f"pid {child.pid} " in p and "uids" in p for p in problems)
    assert any("has capabilities" in p for p in problems)


@needs_root
@pytest.mark.skipif(native.has_cap_sys_resource(), reason="root here may read any rlimit: no shim needed")
def test_prlimit_shim_lets_root_read_a_user_process_rlimits(engine_env):
    """Without CAP_SYS_RESOURCE root cannot read a user's rlimits; through the shim it can."""
    user = subprocess.Popen(["setpriv", f"--reuid={engine_env.user.pw_uid}", f"--regid={engine_env.user.pw_gid}",
                             "--clear-groups", "sleep", "10"])
    try:
        time.sleep(0.1)
        probe = (
            "import ctypes, resource, sys\n"
            "pid = int(sys.argv[1])\n"
            "print(resource.prlimit(pid, resource.RLIMIT_NOFILE)[0])\n"  # glibc prlimit()
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "buf = (ctypes.c_uint64 * 2)()\n"
            "print(libc.syscall(302, pid, 7, None, buf), buf[0])\n"  # syscall(__NR_prlimit64) as CRIU
            "import os; print(os.getresuid())\n"
        )
        plain = subprocess.run([sys.executable, "-c", probe, str(user.pid)], capture_output=True, text=True)
        assert plain.returncode != 0 and "Operation not permitted" in plain.stderr
        shim = str(NATIVE / native.PRLIMIT_SHIM)
        res = subprocess.run([sys.executable, "-c", probe, str(user.pid)], capture_output=True, text=True,
                             env={**os.environ, "LD_PRELOAD": shim})
        assert res.returncode == 0, res.stderr
        nofile, via_syscall, ids = res.stdout.splitlines()
        rc, soft = via_syscall.split()
        assert int(nofile) > 0 and rc == "0" and int(soft) == int(nofile)
        assert ids == "(0, 0, 0)", "the shim put criu's real ids back"
    finally:
        user.kill()
        user.wait()


def test_a_killed_criu_is_named_by_its_signal_even_without_a_python_name():
    from slurm_mm.engine.criu import _signal_name

    assert _signal_name(9) == "SIGKILL"
    assert _signal_name(35) == "signal 35"  # SIGRTMIN+1: not in signal.Signals
