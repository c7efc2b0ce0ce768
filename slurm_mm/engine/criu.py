"""The CRIU binary, driven with the flags real jobs need.

Knows CRIU's command line, its logs and its --inherit-fd keys; never Slurm, never the
store's layout (it is handed a directory). Runs as root: the command line and the
environment of criu are built here from arguments, never taken from the job's
environment or from files the job's user can write.

Flags and why (docs/design.md, measured facts):
- `--file-locks`: jobs hold flock/fcntl locks (restored, still held).
- `--tcp-established` + `--network-lock skip`: jobs have TCP connections; there is no
  iptables binary for CRIU's default network lock (and CRIU here has no nftables).
- `--ext-unix-sk`: a job may be connected to a unix socket outside its tree (syslog).
- `--manage-cgroups=ignore`: the image carries no cgroup paths; a restored tree stays
  in the cgroups its restorer joined (the new job's), never the old job's.
- no `--shell-job`: the tree is a session leader in its own PID namespace (mm-init).
- restore with `-d --restore-sibling --pidfile F`: the restored init is a child of
  the caller, whose waitpid() then gets the job's real exit status.
- `dump` runs with LD_PRELOAD=libmm_prlimit.so where root lacks CAP_SYS_RESOURCE
  (some VMs).
- a restore for a job's owner runs with LD_PRELOAD=libmm_unixsk.so and
  MM_SOCKET_OWNER=uid:gid:groups: CRIU unlinks, binds, connects and chowns unix socket
  paths with the owner's filesystem credentials, so a path the owner swapped for a
  symlink reaches nothing the owner could not reach (native/unixsk_shim.c).
- A tree with its own mount namespace (mm-init --private-proc, for GPU jobs: CUDA needs a
  /proc of its PID namespace) shares every mount with the host's but /proc:
  dump with `--external mnt[]:sm` (each such mount is external, resolved on restore by
  `--ext-mount-map auto`; without it CRIU refuses e.g. the NVIDIA driver's mount), and
  restore with `--root /`. A file opened outside that namespace (a restored job's new
  stdout) is on a mount the namespace does not have: it is dumped as
  `--external file[MNT:INO]` and must be handed back with `--inherit-fd` on restore.
  Mount engine: CRIU's default (mount-v2) with `--root /` restored such trees cleanly
  here; `--mntns-compat-mode` (the old engine, what docs/gpu-validation.md first ran)
  also works but leaves an empty /tmp/cr-tmpfs.* directory behind per restore.
  Without `--root`, mount-v2 hits "BUG at criu/mount.c:48".
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from slurm_mm.engine import cgroups, native
from slurm_mm.errors import CheckpointFailed, ConfigError, NodeIncompatible, RestoreFailed

DEFAULT_CRIU = Path("/opt/slurm_mm/criu/sbin/criu")
MIN_VERSION = (4, 2)  # 3.17 fails `criu check` (vDSO), 4.1.1 cannot dump TCP

COMMON_FLAGS = (
    "--file-locks",
    "--tcp-established",
    "--network-lock",
    "skip",
    "--ext-unix-sk",
    "--manage-cgroups=ignore",
)
SocketOwner = tuple[int, int, Sequence[int]]  # uid, gid, supplementary groups
# A tree in its own mount namespace (see the module docstring).
MNTNS_DUMP_FLAGS = ("--external", "mnt[]:sm")
MNTNS_RESTORE_FLAGS = ("--ext-mount-map", "auto", "--root", "/")
MNTNS_COMPAT_FLAGS = ("--mntns-compat-mode",)
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Harmless on hosts without CAP_SYS_RESOURCE: criu only fails to raise its own fd limit.
_NOISE = re.compile(r"Can't setup RLIMIT_NOFILE for self")


def log_excerpt(log_path: str | os.PathLike, max_lines: int = 15) -> str:
    """The lines of a CRIU log that say what went wrong (errors, warnings, BUGs).

    Falls back to the log's tail when it has none; "" when there is no log.
    """
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    picked = [
        l for l in lines
        if ("Error" in l or "BUG" in l or "Warn" in l) and not _NOISE.search(l)
    ]
    return "\n".join((picked or lines)[-max_lines:])


def external_file_key(mnt_id: int, inode: int) -> str:
    """CRIU's name of a file dumped as external (`--external` / `--inherit-fd` RES)."""
    return f"file[{mnt_id:x}:{inode:x}]"


def _headline(excerpt: str) -> str:
    """The first error line of an excerpt (the cause; later ones are its consequences),
    without CRIU's timestamp and source location."""
    errors = [l for l in excerpt.splitlines() if "Error" in l or "BUG" in l] or excerpt.splitlines()[-1:]
    if not errors:
        return "no log"
    line = re.sub(r"^(\(\s*[\d.]+\)|pie:\s*\d+:)\s*", "", errors[0])
    return re.sub(r"^(Error|Warn)\s*\([^)]*\):\s*", "", line).strip()


@dataclass(frozen=True)
class DumpStats:
    seconds: float  # wall time of `criu dump` (the tree is frozen for most of it)
    log_path: Path


OUTPUT_TAIL = 64 << 10  # bytes of criu's stdout/stderr kept (its log file has the rest)


def _tail_text(f) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - OUTPUT_TAIL))
    return f.read().decode(errors="replace")


def _signal_name(number: int) -> str:
    """SIGKILL for 9; real-time signals have no name of their own in Python's enum."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class Criu:
    """One CRIU installation.

    `prlimit_shim`: "auto" preloads libmm_prlimit.so for dumps when this process lacks
    CAP_SYS_RESOURCE; a path forces that library; None never preloads.
    `env`: extra environment for criu (e.g. LD_LIBRARY_PATH for a carried CRIU).
    `timeout`: seconds any criu command may take before it is killed.
    `mntns_compat_mode`: restore mount namespaces with CRIU's old mount engine.
    `socket_shim`: libmm_unixsk.so for restores with a socket owner ("auto": found
    beside mm-init).
    """

    def __init__(
        self,
        binary: str | os.PathLike = DEFAULT_CRIU,
        *,
        prlimit_shim: str | os.PathLike | None = "auto",
        libexec: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 900.0,
        mntns_compat_mode: bool = False,
        socket_shim: str | os.PathLike = "auto",
    ) -> None:
        self.binary = Path(binary)
        self.timeout = timeout
        self.mntns_compat_mode = mntns_compat_mode
        self.extra_env = dict(env or {})
        if prlimit_shim == "auto":
            self.prlimit_shim = None if native.has_cap_sys_resource() else native.find(native.PRLIMIT_SHIM, libexec)
        else:
            self.prlimit_shim = Path(prlimit_shim) if prlimit_shim else None
        self.libexec = libexec
        self._socket_shim = socket_shim
        self._version: str | None = None

    def socket_shim(self) -> Path:
        """libmm_unixsk.so; ConfigError if it is not installed (no restore for an owner without it)."""
        if self._socket_shim == "auto":
            return native.find(native.UNIXSK_SHIM, self.libexec)
        return Path(self._socket_shim)

    def _env(self, *, preload: bool, socket_owner: SocketOwner | None = None) -> dict[str, str]:
        env = {"PATH": SAFE_PATH, "LANG": "C"}
        env.update(self.extra_env)
        if preload and self.prlimit_shim:
            env["LD_PRELOAD"] = str(self.prlimit_shim)
        if socket_owner is not None:
            uid, gid, groups = socket_owner
            env["LD_PRELOAD"] = str(self.socket_shim())
            env["MM_SOCKET_OWNER"] = f"{int(uid)}:{int(gid)}:{','.join(str(int(g)) for g in groups)}"
        return env

    def _run(self, args: Sequence[str], *, preload: bool = False, timeout: float | None = None,
             socket_owner: SocketOwner | None = None, **kw) -> subprocess.CompletedProcess:
        """criu's stdout and stderr go to files, not pipes: the post-dump action script (and
        anything it starts) inherits them, and a pipe it held would keep the caller waiting
        for EOF after criu itself was killed (timeout, a stopping dump's turn), with the
        node's CRIU gate held."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            res = subprocess.run(
                [str(self.binary), *args],
                env=self._env(preload=preload, socket_owner=socket_owner),
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                timeout=self.timeout if timeout is None else timeout,
                **kw,
            )
            res.stdout, res.stderr = (_tail_text(f) for f in (out, err))
        return res

    def version(self) -> str:
        """CRIU's version, e.g. "4.2.1"; NodeIncompatible if criu is missing or unreadable."""
        if self._version is None:
            try:
                out = self._run(["--version"], timeout=30).stdout
            except (OSError, subprocess.SubprocessError) as exc:
                raise NodeIncompatible(f"cannot run {self.binary}: {exc}") from None
            m = re.search(r"Version:\s*(\S+)", out)
            if not m:
                raise NodeIncompatible(f"{self.binary} --version says nothing of a version: {out.strip()!r}")
            self._version = m.group(1)
        return self._version

    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", self.version())[:3])

    def check(self) -> None:
        """`criu check` and the minimum version; NodeIncompatible with CRIU's words if not."""
        if self.version_tuple()[:2] < MIN_VERSION:
            raise NodeIncompatible(
                f"CRIU {self.version()} at {self.binary} is too old (need >= {'.'.join(map(str, MIN_VERSION))})"
            )
        try:
            res = self._run(["check"], timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            raise NodeIncompatible(f"criu check failed to run: {exc}") from None
        if res.returncode != 0:
            text = (res.stdout + res.stderr).strip()
            raise NodeIncompatible(f"criu check failed: {_headline(text)}", text[-2000:])

    def dump(
        self,
        pid: int,
        images_dir: str | os.PathLike,
        *,
        leave_running: bool,
        leave_stopped: bool = False,
        log_path: str | os.PathLike | None = None,
        mount_ns: bool = False,
        external_files: Sequence[str] = (),
        action_script: str | None = None,
        ghost_limit: int | None = None,
        extra_args: Sequence[str] = (),
        timeout: float | None = None,
    ) -> DumpStats:
        """Dump the tree rooted at `pid` into `images_dir` (which must exist).

        Without `leave_running` CRIU kills the tree once its image is written;
        `leave_stopped` leaves it SIGSTOPped instead (the caller resumes it). On failure
        CheckpointFailed carries CRIU's log excerpt; CRIU then lets the tree run on.
        `mount_ns`: the tree has its own mount namespace; `external_files`: keys
        (external_file_key) of files open in the tree that live outside it.
        `action_script`: criu's --action-script (its post-dump runs with the tree still
        frozen; a failure there fails the dump). `ghost_limit`: the largest deleted-but-open
        file CRIU saves into the image (bytes).
        """
        images_dir = Path(images_dir)
        log_path = Path(log_path) if log_path else images_dir / "dump.log"
        args = ["dump", "--tree", str(pid), "--images-dir", str(images_dir),
                "--log-file", str(log_path), "-v4", *COMMON_FLAGS]
        if leave_running:
            args.append("--leave-running")
        elif leave_stopped:
            args.append("--leave-stopped")
        if mount_ns:
            args.extend(MNTNS_DUMP_FLAGS)
        for key in external_files:
            args += ["--external", key]
        if action_script:
            args += ["--action-script", action_script]
        if ghost_limit is not None:
            args += ["--ghost-limit", str(ghost_limit)]
        args.extend(extra_args)
        started = time.monotonic()
        try:
            res = self._run(args, preload=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CheckpointFailed(
                f"criu dump of pid {pid} timed out after {timeout or self.timeout:.0f} s",
                log_excerpt(log_path),
            ) from None
        except OSError as exc:
            raise CheckpointFailed(f"cannot run {self.binary}: {exc}") from None
        seconds = time.monotonic() - started
        if res.returncode != 0:
            excerpt = log_excerpt(log_path) or (res.stdout + res.stderr).strip()[-2000:]
            if res.returncode < 0:  # killed: its log's last error line is not why
                raise CheckpointFailed(f"criu dump of pid {pid} was killed by {_signal_name(-res.returncode)}",
                                       excerpt)
            raise CheckpointFailed(
                f"criu dump of pid {pid} failed (exit {res.returncode}): {_headline(excerpt)}", excerpt
            )
        return DumpStats(seconds, log_path)

    def restore(
        self,
        images_dir: str | os.PathLike,
        *,
        inherit_fds: Mapping[int, str] | None = None,
        join_cgroups: Sequence[str | os.PathLike] = (),
        log_path: str | os.PathLike | None = None,
        action_script: str | None = None,
        mount_ns: bool = False,
        extra_args: Sequence[str] = (),
        timeout: float | None = None,
        keeper: Sequence[str] = (),
        keeper_fds: Sequence[int] = (),
        socket_owner: SocketOwner | None = None,
    ) -> int | tuple[int, subprocess.Popen]:
        """Restore the tree in `images_dir`; returns the host PID of its root.

        The root becomes a child of THIS process (--restore-sibling): reap it with
        os.waitpid. `inherit_fds` maps an fd open in this process to the CRIU key of
        the file it replaces (--inherit-fd fd[N]:KEY), e.g. the new job's stdout.
        `join_cgroups`: cgroup directories criu (hence the restored tree) joins before
        it runs. `action_script`: a shell command for criu's --action-script.
        `mount_ns`: the image holds a mount namespace of the tree's own.
        `keeper`: a command line (mm-init --keep ... --pid-fd) that runs criu as its child
        and stays the restored root's parent; `keeper_fds` are passed to it. Then the
        result is (root PID, the keeper's Popen): wait for the keeper, not the root.
        `socket_owner`: (uid, gid, groups) whose filesystem credentials CRIU's unix
        socket path operations use (see the module docstring).
        """
        images_dir = Path(images_dir)
        fds = dict(inherit_fds or {})
        if socket_owner is not None:
            try:
                self.socket_shim()
            except ConfigError as exc:
                raise RestoreFailed(f"no restore for a job's owner on this node: {exc}") from None
        with tempfile.TemporaryDirectory(prefix="slurm_mm-restore-") as work:
            pidfile = Path(work) / "root.pid"
            log_path = Path(log_path) if log_path else images_dir / "restore.log"
            args = ["restore", "--images-dir", str(images_dir), "--work-dir", work,
                    "--log-file", str(log_path), "-v4", "--restore-detached",
                    "--restore-sibling", "--pidfile", str(pidfile), *COMMON_FLAGS]
            for fd, key in sorted(fds.items()):
                args += ["--inherit-fd", f"fd[{fd}]:{key}"]
            if action_script:
                args += ["--action-script", action_script]
            if mount_ns:
                args.extend(MNTNS_RESTORE_FLAGS)
                if self.mntns_compat_mode:
                    args.extend(MNTNS_COMPAT_FLAGS)
            args.extend(extra_args)
            if keeper:
                kept = self._run_kept(keeper, args, timeout, tuple(fds) + tuple(keeper_fds), join_cgroups,
                                      images_dir, log_path, socket_owner)
                return self._root_pid(pidfile, images_dir, log_path), kept
            try:
                res = self._run(args, timeout=timeout, pass_fds=tuple(fds), socket_owner=socket_owner,
                                preexec_fn=cgroups.joiner(join_cgroups) if join_cgroups else None)
            except subprocess.TimeoutExpired:
                raise RestoreFailed(
                    f"criu restore from {images_dir} timed out after {timeout or self.timeout:.0f} s",
                    log_excerpt(log_path),
                ) from None
            except (OSError, subprocess.SubprocessError) as exc:
                raise RestoreFailed(f"cannot run {self.binary} for restore: {exc}") from None
            if res.returncode != 0:
                excerpt = log_excerpt(log_path) or (res.stdout + res.stderr).strip()[-2000:]
                raise RestoreFailed(
                    f"criu restore from {images_dir} failed (exit {res.returncode}): {_headline(excerpt)}",
                    excerpt,
                )
            return self._root_pid(pidfile, images_dir, log_path)

    @staticmethod
    def _root_pid(pidfile: Path, images_dir: Path, log_path: Path) -> int:
        try:
            return int(pidfile.read_text().strip())
        except (OSError, ValueError):
            raise RestoreFailed(f"criu restore from {images_dir} wrote no root pid", log_excerpt(log_path)) from None

    def _run_kept(self, keeper: Sequence[str], args: Sequence[str], timeout: float | None,
                  pass_fds: tuple[int, ...], join_cgroups: Sequence[str | os.PathLike], images_dir: Path,
                  log_path: Path, socket_owner: SocketOwner | None = None) -> subprocess.Popen:
        """criu under a keeper (see restore()): the keeper's Popen once criu has ended well.
        The keeper reports criu's exit code on a pipe (its --pid-fd) and keeps running."""
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        out = tempfile.TemporaryFile()
        try:
            try:
                proc = subprocess.Popen(
                    [*keeper, str(wfd), "--", str(self.binary), *args],
                    env=self._env(preload=False, socket_owner=socket_owner),
                    cwd="/", stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                    pass_fds=(*pass_fds, wfd), start_new_session=True,  # not the agent's signals
                    preexec_fn=cgroups.joiner(join_cgroups) if join_cgroups else None)
            except (OSError, subprocess.SubprocessError) as exc:
                raise RestoreFailed(f"cannot run {self.binary} for restore: {exc}") from None
            os.close(wfd)
            wfd = -1
            limit = self.timeout if timeout is None else timeout
            ready, _, _ = select.select([rfd], [], [], limit)
            text = os.read(rfd, 64).decode(errors="replace").strip() if ready else ""
            if not ready:
                _kill_children(proc.pid)  # criu first: the keeper is its parent
                proc.kill()
                proc.wait()
                raise RestoreFailed(f"criu restore from {images_dir} timed out after {limit:.0f} s",
                                    log_excerpt(log_path))
            if text != "0":
                proc.wait()
                excerpt = log_excerpt(log_path) or _tail_text(out).strip()[-2000:]
                raise RestoreFailed(
                    f"criu restore from {images_dir} failed (exit {text or proc.returncode}): {_headline(excerpt)}",
                    excerpt)
            return proc
        finally:
            os.close(rfd)
            if wfd >= 0:
                os.close(wfd)
            out.close()


def _kill_children(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            children = [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        return
    for child in children:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class ImageFiles:
    """Names and sizes of the files CRIU wrote in an images directory."""

    files: dict[str, int] = field(default_factory=dict)

    @classmethod
    def scan(cls, images_dir: str | os.PathLike) -> ImageFiles:
        out = {}
        for entry in os.scandir(images_dir):
            if entry.is_file(follow_symlinks=False):
                out[entry.name] = entry.stat(follow_symlinks=False).st_size
        return cls(out)

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())
