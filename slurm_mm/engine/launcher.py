"""Starting a job's command as a tree that CRIU can dump and restore anywhere.

The command runs under mm-init (slurm_mm/native/mm_init.c): a root-owned init of a new
PID namespace and session, with the command itself dropped to the job user's uid, gid
and groups. This module builds mm-init's command line and hands back the namespace
init's host PID, which is what `checkpoint_tree()` dumps.

Runs as root. It trusts its arguments (uid, gid, command, fds) from its caller; it never
passes its own environment or stdio to the job unless told to, and never runs the
command as root unless `allow_root` says so.

The job's environment is never mm-init's: mm-init (root, dynamically linked, not
setuid, so the loader would honour LD_PRELOAD and the like) starts with MM_INIT_ENV,
built here from nothing, and the job's variables travel as data in a sealed memfd
(`--env-fd`) that only the app process reads, after it dropped to the job user.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

from slurm_mm.engine import cgroups as cgroups_mod
from slurm_mm.engine import native
from slurm_mm.engine.owner import owner_groups
from slurm_mm.errors import LaunchFailed, UsageError


# mm-init's whole environment: it looks nothing up by PATH and loads nothing by name.
MM_INIT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}


def exit_code(status: int) -> int:
    """A waitpid() status as a shell exit code: the code, or 128+N when killed by signal N."""
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return 255


@dataclass
class LaunchedTree:
    """A running job tree: mm-init's outer process and the namespace init's host PID."""

    outer: subprocess.Popen
    init_pid: int
    private_proc: bool = False

    @property
    def outer_pid(self) -> int:
        return self.outer.pid

    def poll(self) -> int | None:
        """The job's exit code if it has ended, else None."""
        rc = self.outer.poll()
        return None if rc is None else (128 - rc if rc < 0 else rc)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the job to end; its exit code (128+N if killed by signal N).

        After a checkpoint that did not leave the job running this is 137: CRIU killed
        the tree. Raises subprocess.TimeoutExpired after `timeout` seconds.
        """
        rc = self.outer.wait(timeout)
        return 128 - rc if rc < 0 else rc

    def signal(self, sig: int) -> None:
        """Send `sig` to the job: mm-init relays it to PID 1, which relays it to the app."""
        try:
            self.outer.send_signal(sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the namespace init: the kernel then kills every process of the tree."""
        try:
            os.kill(self.init_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _default_env(uid: int) -> dict[str, str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return env
    env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name, SHELL=pw.pw_shell or "/bin/sh")
    return env


def environment_fd(env: Mapping[str, str]) -> int:
    """A sealed, close-on-exec memfd holding `env` as NUL-separated NAME=VALUE entries.

    UsageError names a variable that cannot be one (empty name, '=' in the name, NUL).
    """
    blob = bytearray()
    for name, value in env.items():
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise UsageError(f"launch: invalid environment variable {name[:64]!r}")
        blob += f"{name}={value}".encode("utf-8", "surrogateescape") + b"\0"
    fd = os.memfd_create("mm-init-env", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(blob)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def launch(
    argv: Sequence[str],
    *,
    uid: int,
    gid: int,
    groups: Sequence[int] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    stdin: int | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
    join_cgroups: Sequence[str | os.PathLike] = (),
    allow_root: bool = False,
    private_proc: bool = False,
    libexec: str | os.PathLike | None = None,
    start_timeout: float = 10.0,
) -> LaunchedTree:
    """Start `argv` as user `uid`/`gid` in a new PID namespace under mm-init.

    `groups`: supplementary groups (default: the user's, from the group database).
    `env`: the command's whole environment (default: PATH, HOME, USER, LOGNAME, SHELL of
    the user; never this process's environment). It reaches the command only: mm-init
    itself runs with MM_INIT_ENV. `cwd`: the command's directory,
    entered as the user. `stdin`/`stdout`/`stderr`: fds for the job (None: /dev/null;
    use O_APPEND files for output; docs/design.md, measured facts). `join_cgroups`: cgroups the whole tree
    starts in. `private_proc`: the tree also gets its own mount namespace (mounts made
    private, /proc of its PID namespace; the stdio fds reopened there); needed for CUDA.
    Returns once the namespace init exists; the command's own failure to start (not
    found: exit 127) shows in the exit code.
    """
    if not argv:
        raise UsageError("launch: empty command")
    if (uid == 0) and not allow_root:
        raise UsageError("launch: refusing to run a job as root (uid 0) without allow_root")
    mm_init = native.find(native.MM_INIT, libexec)
    groups = list(groups) if groups is not None else owner_groups(uid, gid)
    cmd = [str(mm_init), "--uid", str(uid), "--gid", str(gid),
           "--groups", ",".join(str(g) for g in groups)]
    if cwd is not None:
        cmd += ["--chdir", os.fspath(cwd)]
    if allow_root:
        cmd.append("--allow-root")
    if private_proc:
        cmd.append("--private-proc")

    env_fd = environment_fd(env if env is not None else _default_env(uid))
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    try:
        cmd += ["--pid-fd", str(wfd), "--env-fd", str(env_fd), "--", *argv]
        devnull = subprocess.DEVNULL
        try:
            outer = subprocess.Popen(
                cmd,
                stdin=devnull if stdin is None else stdin,
                stdout=devnull if stdout is None else stdout,
                stderr=devnull if stderr is None else stderr,
                env=dict(MM_INIT_ENV),
                cwd="/",
                pass_fds=(wfd, env_fd),
                close_fds=True,
                start_new_session=True,  # our terminal's signals are not the job's
                preexec_fn=cgroups_mod.joiner(join_cgroups) if join_cgroups else None,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise LaunchFailed(f"cannot start {mm_init}: {exc}") from None
        os.close(wfd)
        wfd = -1
        init_pid = _read_pid(rfd, outer, start_timeout)
    finally:
        os.close(rfd)
        os.close(env_fd)
        if wfd >= 0:
            os.close(wfd)
    return LaunchedTree(outer, init_pid, private_proc)


def _read_pid(rfd: int, outer: subprocess.Popen, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        ready, _, _ = select.select([rfd], [], [], max(left, 0))
        if not ready:
            outer.kill()
            outer.wait()
            raise LaunchFailed(f"mm-init gave no init pid within {timeout:.0f} s")
        chunk = os.read(rfd, 64)
        if not chunk:
            rc = outer.wait()
            raise LaunchFailed(f"mm-init exited with {rc} before starting the job's init (see the job's stderr)")
        data += chunk
    return int(data)
