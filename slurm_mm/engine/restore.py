"""Restoring a job's process tree from a checkpoint made by checkpoint_tree().

`criu restore` brings the tree back as a child of the calling process (so its waitpid
gets the job's real exit status), inside the cgroups it is told to join (the new job's),
with the job's stdin/stdout/stderr replaced by fds it is handed (the new job's output),
then GPU state is restored and unlocked (after the tree runs: the CUDA API hangs on
stopped processes).

A tree dumped with a mount namespace of its own (engine.json `mount_ns`) is restored
into a new one (CRIU's flags for it are criu.py's). Files it held from outside that
namespace were dumped as external (`external_files`): each must be handed back, by the
caller's new stdio fds, or, for /dev/null, by a /dev/null opened here.

Runs as root. It does not trust the image directory: engine.json only names files to
replace, and with `owner_uid` every restored thread is checked before it runs its first
instruction (owner_check.py at CRIU's pre-resume stage): anything but the owner (and
the root mm-init as namespace init) gets the tree killed and ImageRefused raised.
Image integrity itself (who wrote it) is the store's business.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from slurm_mm.engine import native, proctree
from slurm_mm.engine.checkpoint import METADATA, GpuCheckpointing
from slurm_mm.engine.criu import Criu
from slurm_mm.engine.launcher import exit_code
from slurm_mm.engine.owner import owner_groups
from slurm_mm.errors import GpuError, ImageCorrupt, ImageRefused, RestoreFailed

OWNER_CHECK = Path(__file__).with_name("owner_check.py")
STDIO_ROLES = {0: "stdin", 1: "stdout", 2: "stderr"}


@dataclass
class RestoredTree:
    """A restored job tree; its init is a child of this process, or of `keeper` (an
    `mm-init --keep` child of this process that outlives an agent restart)."""

    init_pid: int
    ns_pids: dict[int, int]  # PID inside the job's namespace -> host PID
    gpu_pids: list[int]  # host PIDs whose GPU state was restored
    timings: dict[str, float] = field(default_factory=dict)
    files_report: list[str] = field(default_factory=list)  # what was done to its files first
    _status: int | None = None
    keeper: subprocess.Popen | None = None

    @property
    def waiter_pid(self) -> int:
        """The process whose end is the job's end (its parent here)."""
        return self.keeper.pid if self.keeper is not None else self.init_pid

    def poll(self) -> int | None:
        """The job's exit code if it has ended (reaping it), else None."""
        if self.keeper is not None:
            rc = self.keeper.poll()
            return None if rc is None else (128 - rc if rc < 0 else rc)
        if self._status is None:
            pid, status = os.waitpid(self.init_pid, os.WNOHANG)
            if pid == 0:
                return None
            self._status = status
        return exit_code(self._status)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the job to end; its exit code (128+N if killed by signal N).

        Raises TimeoutError after `timeout` seconds (None: wait as long as it runs).
        """
        if self.keeper is not None:
            try:
                rc = self.keeper.wait(timeout)
                return 128 - rc if rc < 0 else rc
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"restored job (pid {self.init_pid}) still running after {timeout} s") from None
        if self._status is None and timeout is None:
            _, self._status = os.waitpid(self.init_pid, 0)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            code = self.poll()
            if code is not None:
                return code
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"restored job (pid {self.init_pid}) still running after {timeout} s")
            time.sleep(0.02)

    def signal(self, sig: int) -> None:
        """Send `sig` to the namespace init, which relays it to the app's process group."""
        if self._status is None and (self.keeper is None or self.keeper.returncode is None):
            try:
                os.kill(self.init_pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the namespace init: the kernel kills the rest of the namespace."""
        self.signal(signal.SIGKILL)


def read_metadata(images_dir: str | os.PathLike) -> dict[str, Any]:
    """engine.json of an images directory; ImageCorrupt if missing or malformed."""
    path = Path(images_dir) / METADATA
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ImageCorrupt(f"{path} is missing") from None
    except (OSError, ValueError) as exc:
        raise ImageCorrupt(f"{path} is unreadable: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("stdio", {}), dict):
        raise ImageCorrupt(f"{path} is not an engine metadata object")
    return meta


def _inherit_map(meta: dict, fds: Mapping[int, int | None], devnull: Callable[[], int] | None = None,
                 given_keys: frozenset[str] = frozenset()) -> dict[int, str]:
    """fd in this process -> CRIU key of the job's file it replaces.

    Files dumped as external (engine.json `external_files`) must all be covered: by the
    new fd of the stdio role that held them, by an fd the caller hands in for the key
    (`given_keys`: file state's copies), or, for /dev/null, by `devnull()` (an fd of
    /dev/null opened by the caller); RestoreFailed names any other.
    """
    out: dict[int, str] = {}
    keys: set[str] = set()
    external = meta.get("external_files") or {}
    if not isinstance(external, dict):
        raise ImageCorrupt("engine.json: external_files is not an object")
    for role_fd, new_fd in sorted(fds.items()):
        entry = meta.get("stdio", {}).get(str(role_fd))
        if new_fd is None or (isinstance(entry, dict) and entry.get("criu_key") in external):
            continue  # external files are handed out below, all of them
        if not isinstance(entry, dict):
            raise RestoreFailed(f"the image records no {STDIO_ROLES[role_fd]} to replace")
        key, target = entry.get("criu_key"), str(entry.get("target", "?"))
        if target == "/dev/null":
            continue  # /dev/null is everywhere; replacing it would redirect every such fd
        if not isinstance(key, str) or not key or "\n" in key:
            raise RestoreFailed(
                f"the job's {STDIO_ROLES[role_fd]} was {target} ({entry.get('kind')}): "
                "CRIU cannot put a new file in its place"
            )
        if key in keys:
            continue  # stdout and stderr were one file: the first fd given serves both
        keys.add(key)
        out[new_fd] = key
    for key, target in sorted(external.items()):
        if key in given_keys:
            continue
        given = [fds[r] for r in sorted(fds) if fds[r] is not None
                 and (meta.get("stdio", {}).get(str(r)) or {}).get("criu_key") == key]
        if target == "/dev/null" and devnull is not None:
            out[devnull()] = key  # as everywhere: /dev/null stays /dev/null
        elif given:
            out[given[0]] = key
        else:
            roles = [STDIO_ROLES[r] for r in sorted(STDIO_ROLES)
                     if (meta.get("stdio", {}).get(str(r)) or {}).get("criu_key") == key]
            raise RestoreFailed(
                f"the job held {target} from outside its mount namespace "
                f"({', '.join(roles) or 'not its stdio'}): CRIU needs a new fd for it"
                + (f"; pass a new {roles[0]}" if roles else "")
            )
    return out


def _owner_gids(uid: int, gids: Sequence[int] | None) -> list[int]:
    if gids is not None:
        return sorted(set(gids))
    try:
        return owner_groups(uid)
    except KeyError:
        raise RestoreFailed(f"owner uid {uid} has no passwd entry: pass its gids") from None


def _primary_gid(uid: int, gids: Sequence[int]) -> int:
    """The owner's primary group when it is among `gids` (new socket files get it), else the first."""
    try:
        primary = pwd.getpwuid(uid).pw_gid
    except KeyError:
        primary = None
    return primary if primary in gids or not gids else gids[0]


def _owner_script(work: Path, uid: int, gids: Sequence[int], given: Sequence[int] = (),
                  libexec: str | os.PathLike | None = None) -> tuple[str, Path]:
    """An action script for criu (it execs the path, no shell) and its verdict file.
    `given`: fds the caller hands the tree (--inherit-fd): their files are the caller's choice."""
    verdict = work / "owner.json"
    script = work / "owner-check.sh"
    cmd = [sys.executable, "-I", str(OWNER_CHECK), "--uid", str(uid),
           "--gids", ",".join(str(g) for g in gids), "--verdict", str(verdict)]
    for exe in native.installed_inits(libexec):
        cmd += ["--init-exe", str(exe)]
    for fd in given:
        st = os.fstat(fd)
        cmd += ["--given", f"{st.st_dev}:{st.st_ino}"]
    script.write_text(
        "#!/bin/sh\n"
        '[ "$CRTOOLS_SCRIPT_ACTION" = pre-resume ] || exit 0\n'
        f"exec {shlex.join(cmd)}\n"
    )
    script.chmod(0o700)
    return str(script), verdict


def _reap(pid: int, keeper: subprocess.Popen | None = None) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if keeper is not None:
        keeper.wait()
        return
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def restore_tree(
    images_dir: str | os.PathLike,
    *,
    stdin: int | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
    join_cgroups: Sequence[str | os.PathLike] = (),
    owner_uid: int | None = None,
    owner_gids: Sequence[int] | None = None,
    gpu: GpuCheckpointing | None = None,
    gpu_resume_options: Mapping[str, Any] | None = None,
    criu: Criu | None = None,
    log_path: str | os.PathLike | None = None,
    extra_criu_args: Sequence[str] = (),
    timeout: float | None = None,
    extra_inherit: Mapping[int, str] | None = None,
    libexec: str | os.PathLike | None = None,
    status_fd: int | None = None,
) -> RestoredTree:
    """Restore the tree in `images_dir` as a child of this process.

    `stdin`/`stdout`/`stderr`: fds open here that replace the job's (as recorded in
    engine.json); pass O_APPEND fds for output. `join_cgroups`: cgroups (directories or
    cgroup.procs files) the restored tree lives in. `owner_uid`/`owner_gids`: refuse
    (ImageRefused) a tree with any other identity (gids default to the owner's groups).
    `gpu`: resumes the GPU state of the processes checkpointed with it;
    `gpu_resume_options` go to its resume() (e.g. gpu_pairs). `log_path`: CRIU's log
    (default images_dir/restore.log). `extra_inherit`: more fds standing in for files of
    the image (fd -> CRIU key; filestate.prepare's copies). `libexec`: the directory the
    tree's mm-init was launched from (the only root executables its init may run).
    `status_fd`: the tree is restored under `mm-init --keep` (from `libexec`), which
    writes the job's exit code to this fd when it ends (read by an agent that is no
    longer its parent after a restart). Raises RestoreFailed (CRIU's log excerpt in
    `.log_excerpt`), ImageRefused or ImageCorrupt; on any failure no restored process
    is left running.
    """
    criu = criu or Criu()
    images_dir = Path(images_dir)
    started = time.monotonic()
    fds = {0: stdin, 1: stdout, 2: stderr}
    meta: dict[str, Any] = {}
    if any(fd is not None for fd in fds.values()) or gpu is not None or (images_dir / METADATA).exists():
        meta = read_metadata(images_dir)
    gpu_ns = [int(p) for p in meta.get("gpu_ns_pids", []) if isinstance(p, int)]
    if gpu is None and gpu_ns:
        # Restored without the driver's restore, they would stay locked: hung, not failed.
        raise RestoreFailed(f"the image holds the GPU state of {len(gpu_ns)} process(es) but was restored "
                            "without a GPU checkpointer: refused before anything of it runs")
    opened: list[int] = []

    def devnull() -> int:
        opened.append(os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC))
        return opened[-1]

    try:
        inherit = _inherit_map(meta, fds, devnull, frozenset((extra_inherit or {}).values())) if meta else {}
        inherit.update(extra_inherit or {})
        root, keeper = _criu_restore(criu, images_dir, meta, inherit, join_cgroups, owner_uid, owner_gids,
                                     log_path, extra_criu_args, timeout, libexec, status_fd)
    finally:
        for fd in opened:
            os.close(fd)
    tree = RestoredTree(init_pid=root, ns_pids=proctree.ns_pid_map(root), gpu_pids=[], keeper=keeper)
    tree.timings["restore"] = time.monotonic() - started

    if gpu is not None and gpu_ns:
        t = time.monotonic()
        missing = [p for p in gpu_ns if p not in tree.ns_pids]
        host = [tree.ns_pids[p] for p in gpu_ns if p in tree.ns_pids]
        try:
            if missing:
                raise GpuError(f"processes {missing} of the image were not restored")
            tree.gpu_pids = list(gpu.resume(host, **dict(gpu_resume_options or {})))
        except GpuError as exc:
            _reap(root, keeper)
            raise RestoreFailed(f"restored tree killed: its GPU state could not be restored: {exc}") from exc
        tree.timings["gpu_resume"] = time.monotonic() - t
    tree.timings["total"] = time.monotonic() - started
    return tree


def _criu_restore(criu: Criu, images_dir: Path, meta: dict, inherit: dict[int, str],
                  join_cgroups: Sequence[str | os.PathLike], owner_uid: int | None,
                  owner_gids: Sequence[int] | None, log_path: str | os.PathLike | None,
                  extra_criu_args: Sequence[str], timeout: float | None,
                  libexec: str | os.PathLike | None = None,
                  status_fd: int | None = None) -> tuple[int, subprocess.Popen | None]:
    """`criu restore` with the owner check; the restored root's host PID and its keeper."""
    with tempfile.TemporaryDirectory(prefix="slurm_mm-restore-") as tmp:
        work = Path(tmp)
        action, verdict_path = (None, None)
        if owner_uid is not None:
            action, verdict_path = _owner_script(work, owner_uid, _owner_gids(owner_uid, owner_gids),
                                                 list(inherit), libexec)
        socket_owner = None
        if owner_uid is not None:
            gids = _owner_gids(owner_uid, owner_gids)
            socket_owner = (owner_uid, _primary_gid(owner_uid, gids), gids)
        keeper_argv: list[str] = []
        if status_fd is not None:
            keeper_argv = [str(native.find(native.MM_INIT, libexec)), "--keep", "--status-fd", str(status_fd),
                           "--pid-fd"]
        try:
            got = criu.restore(images_dir, inherit_fds=inherit, join_cgroups=join_cgroups,
                               log_path=log_path, action_script=action,
                               mount_ns=bool(meta.get("mount_ns")),
                               extra_args=extra_criu_args, timeout=timeout,
                               keeper=keeper_argv, keeper_fds=() if status_fd is None else (status_fd,),
                               socket_owner=socket_owner)
        except RestoreFailed as exc:
            _check_verdict(verdict_path, cause=exc)
            raise
        root, keeper = got if isinstance(got, tuple) else (got, None)
        try:
            _check_verdict(verdict_path)
        except ImageRefused:
            _reap(root, keeper)
            raise
    return root, keeper


def _check_verdict(verdict_path: Path | None, cause: RestoreFailed | None = None) -> None:
    """ImageRefused if owner_check refused the tree (or, unasked, never ran)."""
    if verdict_path is None:
        return
    try:
        verdict = json.loads(verdict_path.read_text())
    except (OSError, ValueError):
        if cause is not None:
            return  # CRIU failed before the check: its own error says more
        raise ImageRefused("the restored tree's owner was not checked (pre-resume check did not run)") from None
    if not verdict.get("ok"):
        root = verdict.get("root")
        if isinstance(root, int) and root > 0:
            _reap(root)
        problems = "; ".join(str(p) for p in verdict.get("problems", []))[:500]
        raise ImageRefused(f"restored tree refused, it would not run as its owner or holds what its owner "
                           f"could not open: {problems}") from cause
