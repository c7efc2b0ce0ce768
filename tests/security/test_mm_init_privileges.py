"""mm-init's root parts, directly (real mm-init, no Slurm): the job's environment reaches
only the app, and the private-/proc stdio reopen is the user's own."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

from engine_fixtures import engine_env, needs_root  # noqa: F401
from slurm_mm.engine import launch

pytestmark = needs_root

PROBE_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void record(void)
{
	char line[64];
	int fd = open(RECORD, O_WRONLY | O_APPEND | O_CREAT, 0666), n;
	if (fd < 0) return;
	n = snprintf(line, sizeof(line), "euid=%d\n", (int)geteuid());
	write(fd, line, (size_t)n);
	close(fd);
}
"""


def _user_dir(engine_env) -> Path:
    d = Path(tempfile.mkdtemp(dir=engine_env.base))
    d.chmod(0o777)
    return d


def _out(engine_env, d: Path) -> int:
    fd = os.open(d / "out.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.fchown(fd, engine_env.user.pw_uid, engine_env.user.pw_gid)
    return fd


def test_loader_variables_of_the_job_reach_the_app_only(engine_env):
    d = _user_dir(engine_env)
    record = d / "euid.log"
    (d / "probe.c").write_text(PROBE_C)
    subprocess.run(["gcc", "-shared", "-fPIC", f'-DRECORD="{record}"', "-o", str(d / "probe.so"),
                    str(d / "probe.c")], check=True)
    out = _out(engine_env, d)
    u = engine_env.user
    env = {"LD_PRELOAD": str(d / "probe.so"), "GCONV_PATH": str(d), "MINE": "x y", "PATH": "/usr/bin:/bin"}
    try:
        for private in (False, True):
            tree = launch(["sh", "-c", 'echo "app: $MINE $LD_PRELOAD"'], uid=u.pw_uid, gid=u.pw_gid, env=env,
                          stdout=out, stderr=out, private_proc=private, libexec=engine_env.libexec)
            assert tree.wait(10) == 0
    finally:
        os.close(out)
    assert (d / "out.log").read_text() == f"app: x y {d}/probe.so\n" * 2
    records = record.read_text().splitlines()
    assert records and set(records) == {f"euid={u.pw_uid}"}, records


def test_private_proc_never_turns_an_o_path_stdin_into_a_readable_one(engine_env):
    d = _user_dir(engine_env)
    out = _out(engine_env, d)
    stdin = os.open("/etc/shadow", os.O_PATH)
    u = engine_env.user
    try:
        tree = launch(["sh", "-c", "head -c 100; echo; echo done"], uid=u.pw_uid, gid=u.pw_gid,
                      stdin=stdin, stdout=out, stderr=out, private_proc=True, libexec=engine_env.libexec)
        tree.wait(10)
    finally:
        os.close(out)
        os.close(stdin)
    text = (d / "out.log").read_text()
    assert "done" in text and "root:" not in text, text


def test_private_proc_reopens_stdio_only_as_the_user_could(engine_env):
    """A root-only file handed as stdout stays the original fd: never reopened by root."""
    secret = Path(tempfile.mkdtemp(dir=engine_env.base)) / "root-only.log"  # dir 0700 root
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    u = engine_env.user
    try:
        tree = launch(["sh", "-c", "sleep 5"], uid=u.pw_uid, gid=u.pw_gid, stdout=fd, stderr=fd,
                      private_proc=True, libexec=engine_env.libexec)
        deadline = time.monotonic() + 5
        while not (kids := Path(f"/proc/{tree.init_pid}/task/{tree.init_pid}/children").read_text().split()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        app = int(kids[0])
        host_mnt = int(next(l for l in open(f"/proc/self/fdinfo/{fd}") if l.startswith("mnt_id:")).split()[1])
        app_mnt = int(next(l for l in open(f"/proc/{app}/fdinfo/1") if l.startswith("mnt_id:")).split()[1])
        assert app_mnt == host_mnt, "root reopened a file its user may not open"
        tree.kill()
        tree.wait(10)
    finally:
        os.close(fd)
