"""GPU checkpointing validated on a real NVIDIA GPU (run on the GPU machine).

As a script: `python3 tests/gpu/validate_gpu.py [--gb 8] [--child-gb 2] [--criu PATH]
[--out DIR]` runs every check in order and prints a log and a JSON summary
(validate_gpu.json under --out). Under pytest the same checks are tests marked `gpu`
(tests/gpu/test_gpu_machine.py), skipped with the reason where there is no GPU with
the CUDA checkpoint API or no PyTorch.

The workload (gpu_workload.py) proves its own continuity: every element of its GPU
pattern and its GPU-side step counter are checked by the workload itself, on request.
Its tree: a CUDA root, a CUDA child and a plain (non-CUDA) process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from slurm_mm.engine import gpu, gpu_inventory  # noqa: E402
from slurm_mm.engine.gpu import CudaState, GpuCheckpointer, GpuTimeouts  # noqa: E402
from slurm_mm.errors import GpuError  # noqa: E402

WORKLOAD = Path(__file__).with_name("gpu_workload.py")
T0 = time.monotonic()
ONLY: set[str] = set()


def say(*parts) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s]", *parts, flush=True)


def gpu_memory_used_mib() -> int:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, timeout=20, check=True,
    ).stdout
    return sum(int(x) for x in out.split())


def rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


def ns_pid(pid: int) -> int:
    """The PID a process has in its own (innermost) PID namespace."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return pid


def become_subreaper() -> None:
    """Orphans of the dumped tree come to us, not to the VM's PID 1 (which reaps late)."""
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def gone(pids: list[int]) -> bool:
    """True when none of `pids` exists any more; reaps those that are our zombies."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    return not any(Path(f"/proc/{p}").exists() for p in pids)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Workload:
    """A gpu_workload.py tree: a session leader, or PID 1 of its own PID + mount namespace."""

    def __init__(self, workdir: Path, gb: float, child_gb: float, unshare: bool = False) -> None:
        self.workdir = workdir
        self.gb, self.child_gb = gb, child_gb
        self.status_path = workdir / "status.json"
        self.log = open(workdir / "workload.log", "ab")  # O_APPEND: CRIU restores the offset
        cmd = [sys.executable, str(WORKLOAD), "--gb", str(gb), "--child-gb", str(child_gb),
               "--status", str(self.status_path)]
        self.in_pidns = unshare
        if unshare:
            # PID 1 of a new PID + mount namespace with its own /proc, session leader:
            # CUDA needs /proc to match its PID namespace (error 304 otherwise), and CRIU
            # restores a mount namespace only if the tree's root has it too. The outer
            # unshare writes only to its own log (it is never dumped).
            self.proc = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c",
                 'exec >>"$0" 2>&1 </dev/null; exec setsid "$@"', str(workdir / "workload.log"), *cmd],
                stdin=subprocess.DEVNULL, stdout=open(workdir / "outer.log", "ab"), stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.root = wait_for(lambda: gpu.process_tree(self.proc.pid)[1:2], 30, "PID 1 of the namespace")[0]
        else:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
                start_new_session=True,  # session leader: CRIU dumps it without a terminal
            )
            self.root = self.proc.pid
        self._cuda_ns: list[int] = []

    def status(self, child: bool = False) -> dict:
        path = Path(str(self.status_path) + (".child" if child else ""))
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def paths(self) -> list[bool]:
        return [False, True] if self.child_gb > 0 else [False]

    def wait_ready(self, timeout: float = 180) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"workload exited with {self.proc.returncode}: see {self.workdir}/workload.log")
            return all(self.status(c).get("iters") for c in self.paths())

        wait_for(ready, timeout, "workload ready")
        self._cuda_ns = [ns_pid(p) for p in self.tree() if gpu.nvidia_files(p)]

    def rebind(self, root: int) -> None:
        """After `criu restore` into a new PID namespace: the same tree, new host PIDs."""
        self.root = root

    @property
    def cuda_pids(self) -> list[int]:
        """Host PIDs of the CUDA processes (found while they held /dev/nvidia*)."""
        by_ns = {ns_pid(p): p for p in self.tree()}
        return [by_ns[n] for n in self._cuda_ns if n in by_ns]

    @property
    def plain_pid(self) -> int:
        return [p for p in self.tree() if ns_pid(p) not in self._cuda_ns][-1]

    def tree(self) -> list[int]:
        return [p for p in gpu.process_tree(self.root) if Path(f"/proc/{p}").exists()]

    def iters(self) -> list[int]:
        return [self.status(c).get("iters", 0) for c in self.paths()]

    def advancing(self, timeout: float = 30) -> bool:
        before = self.iters()
        wait_for(lambda: all(a > b for a, b in zip(self.iters(), before)), timeout, "iterations to advance")
        return True

    def verify(self, timeout: float = 180) -> list[dict]:
        """Ask the tree to check its own data; returns each CUDA process's verdict."""
        seqs = [self.status(c).get("verify_seq", 0) for c in self.paths()]
        os.kill(self.root, signal.SIGUSR1)
        wait_for(
            lambda: all(self.status(c).get("verify_seq", 0) > s for c, s in zip(self.paths(), seqs)),
            timeout, "self-verification",
        )
        keys = ("pid", "data_ok", "bad_elements", "gpu_counter", "cpu_counter", "verify_s")
        return [{k: self.status(c).get(k) for k in keys} for c in self.paths()]

    def expected_mib(self) -> float:
        return (self.gb + self.child_gb) * 1024

    def stop(self) -> None:
        for pid in reversed(self.tree()):
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def assert_intact(workload: Workload, results: dict, key: str) -> None:
    verdicts = workload.verify()
    results[key] = verdicts
    say(f"{key}:", verdicts)
    assert all(v["data_ok"] for v in verdicts), verdicts
    workload.advancing()


# ------------------------------------------------------------------------- the checks


def check_driver_facts(wl: Workload, gc: GpuCheckpointer, results: dict) -> None:
    """Raw driver answers the module relies on (error codes for non-CUDA PIDs etc.)."""
    worker = gpu.DriverWorker()
    greeting = worker.start()
    facts: dict = {"greeting": greeting}
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    probes = {
        "cuda_root": wl.root,
        "plain_child": wl.plain_pid,
        "pid_1": 1,
        "no_such_pid": pid_max - 1,
        "self": os.getpid(),
    }
    for name, pid in probes.items():
        for op in ("state", "restore_tid"):
            try:
                facts[f"{op}:{name}"] = worker.call({"op": op, "pid": pid}, timeout=10)
            except GpuError as exc:
                facts[f"{op}:{name}"] = f"{type(exc).__name__}: {exc}"
    worker.close()
    facts["nvidia_files_root"] = gpu.nvidia_files(wl.root)
    facts["nvidia_files_plain"] = gpu.nvidia_files(wl.plain_pid)
    results["driver_facts"] = facts
    say("driver facts:", json.dumps(facts))
    assert gc.state(wl.root) is CudaState.RUNNING
    assert gc.state(wl.plain_pid) is None


def suspend_and_resume(wl: Workload, gc: GpuCheckpointer, results: dict, key: str) -> None:
    tree = wl.tree()
    mem_before = gpu_memory_used_mib()
    rss_before = [rss_mib(p) for p in wl.cuda_pids]
    t0 = time.monotonic()
    suspended = gc.suspend(tree)
    suspend_s = time.monotonic() - t0
    timings_suspend = dict(gc.last_timings)
    states = {p: gc.state(p).name for p in wl.cuda_pids}
    mem_during = gpu_memory_used_mib()
    rss_during = [rss_mib(p) for p in wl.cuda_pids]
    files_during = {p: gpu.nvidia_files(p) for p in wl.cuda_pids}
    iters_a = wl.iters()
    time.sleep(3)
    iters_b = wl.iters()
    t0 = time.monotonic()
    resumed = gc.resume(tree)
    resume_s = time.monotonic() - t0
    timings_resume = dict(gc.last_timings)
    mem_after = gpu_memory_used_mib()
    out = {
        "tree": tree, "suspended": suspended, "resumed": resumed,
        "suspend_s": round(suspend_s, 2), "resume_s": round(resume_s, 2),
        "timings_suspend": timings_suspend, "timings_resume": timings_resume,
        "states_while_suspended": states, "gpu_mem_used_mib_before_during_after": [mem_before, mem_during, mem_after],
        "rss_mib_before_during": [rss_before, rss_during], "nvidia_files_while_suspended": files_during,
        "iters_while_suspended": [iters_a, iters_b],
    }
    results[key] = out
    say(f"{key}:", json.dumps(out))
    assert sorted(suspended) == sorted(wl.cuda_pids)
    assert all(s == "CHECKPOINTED" for s in states.values())
    assert all(not f for f in files_during.values())
    assert mem_before - mem_during > 0.95 * wl.expected_mib(), "GPU memory was not freed"
    assert iters_a == iters_b, "the tree ran CUDA work while checkpointed"
    assert sorted(resumed) == sorted(wl.cuda_pids)
    assert all(gc.state(p) is CudaState.RUNNING for p in wl.cuda_pids)
    assert_intact(wl, results, key + "_verdict")


def check_checkpoint_restore(wl: Workload, gc: GpuCheckpointer, results: dict) -> None:
    """lock+checkpoint the tree -> GPU memory freed, no CUDA work -> restore+unlock -> intact.

    This is also the engine's rollback when the CPU dump fails after suspend().
    """
    suspend_and_resume(wl, gc, results, "checkpoint_restore")


class FailingCheckpointer(GpuCheckpointer):
    """A real checkpointer whose call `fail_op` on `fail_pid` fails as the driver would."""

    fail_op = "checkpoint"
    fail_pid = -1

    def _call(self, op, pid, **extra):
        if op == self.fail_op and pid == self.fail_pid:
            time.sleep(0.5)  # let the other processes' calls get under way
            raise gpu.CudaCallFailed(op, pid, 999, "INJECTED_FAILURE")
        return super()._call(op, pid, **extra)


def check_rollback(wl: Workload, results: dict) -> None:
    """A checkpoint failing after another process was checkpointed puts the tree back."""
    fc = FailingCheckpointer.open()
    assert fc is not None
    out: dict = {}
    try:
        fc.fail_pid = wl.cuda_pids[-1]
        t0 = time.monotonic()
        try:
            fc.suspend(wl.tree())
        except GpuError as exc:
            out["error"] = str(exc)
        out["rollback_s"] = round(time.monotonic() - t0, 2)
        out["timings"] = dict(fc.last_timings)
        out["states_after"] = {p: fc.state(p).name for p in wl.cuda_pids}
    finally:
        fc.close()
    results["rollback"] = out
    say("rollback:", json.dumps(out))
    assert "INJECTED_FAILURE" in out.get("error", "") and "rolled back" in out["error"], out
    assert all(s == "RUNNING" for s in out["states_after"].values())
    assert_intact(wl, results, "rollback_verdict")


def check_remapped_restore(wl: Workload, gc: GpuCheckpointer, results: dict) -> None:
    """Restore with an explicit (identity) GPU UUID map: the CUuuid layout is right."""
    inventory = gpu_inventory.read_inventory()
    pairs = [(gpu_inventory.uuid_hex(u), gpu_inventory.uuid_hex(u)) for u in inventory.uuids]
    suspended = gc.suspend(wl.tree())
    out: dict = {"pairs": pairs, "suspend": dict(gc.last_timings)}
    try:
        gc.resume(suspended, gpu_pairs=pairs)
        out["resume"] = dict(gc.last_timings)
    except GpuError as exc:
        out["error"] = str(exc)
        gc.resume(suspended)  # never leave the tree checkpointed
    results["remapped_restore"] = out
    say("remapped restore:", json.dumps(out))
    assert "error" not in out, out
    assert_intact(wl, results, "remapped_restore_verdict")


def check_inventory(wl: Workload, results: dict) -> None:
    """NVML and nvidia-smi give the same inventory; the node is compatible with itself."""
    nvml = gpu_inventory.read_inventory()
    real_import = gpu_inventory._import_pynvml

    def no_pynvml():
        raise ImportError("pretend pynvml is missing")

    gpu_inventory._import_pynvml = no_pynvml
    try:
        smi = gpu_inventory.read_inventory()
        smi_usage = gpu_inventory.process_gpu_memory()
    finally:
        gpu_inventory._import_pynvml = real_import
    usage = gpu_inventory.process_gpu_memory()
    out = {
        "nvml": nvml.to_dict(), "nvidia_smi": smi.to_dict(),
        "free_mib": [g.memory_free // (1 << 20) for g in nvml.gpus],
        "usage_nvml": {str(k): v for k, v in usage.items()},
        "usage_smi": {str(k): v for k, v in smi_usage.items()},
    }
    current = gpu_inventory.check_compatible(nvml.to_dict(), needed_bytes=1 << 30)
    out["compatible_with_itself"] = current is not None
    results["inventory"] = out
    say("inventory:", json.dumps(out))
    assert nvml.to_dict()["gpus"] == smi.to_dict()["gpus"]
    assert nvml.driver_version == smi.driver_version
    assert nvml.cuda_driver_version == smi.cuda_driver_version
    assert wl.root in usage and wl.root in smi_usage


# A tree with its own mount namespace (the PID-namespace layout) shares every mount with
# the host's: CRIU must treat them as external, else it refuses the driver's mount
# ("FS mnt ./usr/local/nvidia ... unsupported").
MNTNS_DUMP = ["--external", "mnt[]:sm"]
MNTNS_RESTORE = ["--ext-mount-map", "auto", "--mntns-compat-mode", "--root", "/"]


def check_criu_chain(wl: Workload, gc: GpuCheckpointer, criu: str, results: dict, key: str) -> None:
    """GPU checkpoint + criu dump (tree killed) -> criu restore + GPU restore -> intact."""
    dump_extra = MNTNS_DUMP if wl.in_pidns else []
    restore_extra = MNTNS_RESTORE if wl.in_pidns else []
    images = Path(tempfile.mkdtemp(prefix="mm-criu-", dir="/var/tmp"))
    tree = wl.tree()
    out: dict = {"tree": tree, "in_pidns": wl.in_pidns, "images": str(images)}
    out["verdict_before"] = wl.verify()
    cuda_before = wl.cuda_pids
    t0 = time.monotonic()
    suspended = gc.suspend(tree)
    out["gpu_suspend_s"] = round(time.monotonic() - t0, 2)
    out["gpu_suspend_timings"] = dict(gc.last_timings)
    assert sorted(suspended) == sorted(cuda_before)
    t0 = time.monotonic()
    dump = subprocess.run(
        [criu, "dump", "-t", str(wl.root), "-D", str(images), "-o", "dump.log", "-v4", "--file-locks", *dump_extra],
        capture_output=True, text=True, timeout=300,
    )
    out["criu_dump_s"] = round(time.monotonic() - t0, 2)
    out["criu_dump_rc"] = dump.returncode
    out["image_mib"] = sum(f.stat().st_size for f in images.iterdir()) // (1 << 20)
    if dump.returncode != 0:
        out["dump_log_tail"] = (images / "dump.log").read_text()[-3000:]
        results[key] = out
        gc.resume(tree)
        raise AssertionError(f"criu dump failed: {out['dump_log_tail'][-800:]}")
    try:
        wl.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    wait_for(lambda: gone(tree), 30, "dumped tree to be gone")
    out["gone_after_dump"] = True
    t0 = time.monotonic()
    restore = subprocess.run(
        [criu, "restore", "-D", str(images), "-d", "-o", "restore.log", "-v4", "--file-locks",
         "--pidfile", str(images / "restored.pid"), *restore_extra],
        capture_output=True, text=True, timeout=300,
    )
    out["criu_restore_s"] = round(time.monotonic() - t0, 2)
    out["criu_restore_rc"] = restore.returncode
    if restore.returncode != 0:
        out["restore_log_tail"] = (images / "restore.log").read_text()[-3000:]
        results[key] = out
        raise AssertionError(f"criu restore failed: {out['restore_log_tail'][-800:]}")
    restored_root = int((images / "restored.pid").read_text())
    wl.rebind(restored_root)
    out["restored_root"] = restored_root
    out["restored_tree"] = wl.tree()
    out["nvidia_files_after_criu_restore"] = {p: gpu.nvidia_files(p) for p in wl.tree()}
    out["states_after_criu_restore"] = {p: str(gc.state(p)) for p in wl.tree()}
    t0 = time.monotonic()
    resumed = gc.resume(wl.tree())
    out["gpu_resume_s"] = round(time.monotonic() - t0, 2)
    out["gpu_resume_timings"] = dict(gc.last_timings)
    out["resumed"] = resumed
    out["gpu_mem_used_mib_after"] = gpu_memory_used_mib()
    results[key] = out
    say(f"{key}:", json.dumps(out))
    if not wl.in_pidns:
        assert restored_root == tree[0]
    assert sorted(resumed) == sorted(wl.cuda_pids) and len(resumed) == len(cuda_before)
    assert_intact(wl, results, key + "_verdict")
    # The counters went on from where the dump left them: no step lost or repeated.
    assert all(v["gpu_counter"] == v["cpu_counter"] for v in results[key + "_verdict"])
    subprocess.run(["rm", "-rf", str(images)], timeout=120, check=False)


def check_pidns_chain(gc: GpuCheckpointer, criu: str, gb: float, child_gb: float, results: dict) -> None:
    """The CRIU chain for a tree that is PID 1 of its own PID + mount namespace."""
    wl = Workload(Path(tempfile.mkdtemp(prefix="mm-gpu-ns-", dir="/var/tmp")), gb, child_gb, unshare=True)
    try:
        wl.wait_ready()
        check_criu_chain(wl, gc, criu, results, "criu_chain_pidns")
    finally:
        wl.stop()
        try:
            (Path(os.environ.get("OUT", ".")) / "workload-pidns.log").write_bytes(
                (wl.workdir / "workload.log").read_bytes()[-20000:])
        except OSError:
            pass


def check_engine_chain(gc: GpuCheckpointer, criu_path: str, gb: float, child_gb: float, results: dict) -> None:
    """The CPU engine (checkpoint_tree / restore_tree) with this GpuCheckpointer.

    A periodic checkpoint (leave_running: GPU suspend, dump, GPU resume), then a
    preemption one (the tree is killed), then restore_tree (criu restore + GPU resume).
    The tree is PID 1 of its own PID + mount namespace (see criu_chain_pidns), made by
    `unshare`, not by mm-init: the engine must find the namespace by itself.
    (validate_mm_init.py runs the same with a tree launched by mm-init --private-proc.)
    """
    from slurm_mm.engine import Criu, checkpoint_tree, restore_tree

    wl = Workload(Path(tempfile.mkdtemp(prefix="mm-gpu-eng-", dir="/var/tmp")), gb, child_gb, unshare=True)
    criu = Criu(criu_path)
    out: dict = {"criu": criu.version(), "prlimit_shim": str(criu.prlimit_shim)}
    restored = None
    try:
        wl.wait_ready()
        cuda = sorted(wl.cuda_pids)
        images = Path(tempfile.mkdtemp(prefix="mm-eng-", dir="/var/tmp"))
        # No extra CRIU flags: checkpoint_tree finds the tree's mount namespace itself and
        # records it in engine.json, and restore_tree adds what CRIU needs for it.
        periodic = checkpoint_tree(wl.root, images / "periodic", leave_running=True, gpu=gc, criu=criu)
        out["periodic"] = {"gpu_pids": periodic.gpu_pids, "timings": periodic.timings,
                           "image_mib": periodic.image_bytes >> 20, "mount_ns": periodic.mount_ns}
        say("engine periodic checkpoint:", json.dumps(out["periodic"]))
        assert sorted(periodic.gpu_pids) == cuda and periodic.mount_ns
        assert_intact(wl, results, "engine_periodic_verdict")
        tree = wl.tree()
        final = checkpoint_tree(wl.root, images / "final", leave_running=False, gpu=gc, criu=criu)
        out["final"] = {"gpu_pids": final.gpu_pids, "timings": final.timings, "image_mib": final.image_bytes >> 20}
        wait_for(lambda: gone(tree), 30, "checkpointed tree to be gone")
        restored = restore_tree(images / "final", gpu=gc, criu=criu)
        wl.rebind(restored.init_pid)
        out["restore"] = {"init_pid": restored.init_pid, "ns_pids": restored.ns_pids,
                          "gpu_pids": restored.gpu_pids, "timings": restored.timings}
        results["engine_chain"] = out
        say("engine chain:", json.dumps(out))
        assert sorted(restored.gpu_pids) == sorted(wl.cuda_pids) and len(restored.gpu_pids) == len(cuda)
        assert_intact(wl, results, "engine_chain_verdict")
        assert all(v["gpu_counter"] == v["cpu_counter"] for v in results["engine_chain_verdict"])
        subprocess.run(["rm", "-rf", str(images)], timeout=120, check=False)
    finally:
        results.setdefault("engine_chain", out)
        wl.stop()
        if restored is not None:
            try:
                restored.wait(timeout=10)
            except Exception:  # noqa: BLE001 - cleanup only
                pass
        try:
            (Path(os.environ.get("OUT", ".")) / "workload-engine.log").write_bytes(
                (wl.workdir / "workload.log").read_bytes()[-20000:])
        except OSError:
            pass


def check_watchdog(wl: Workload, results: dict) -> None:
    """Driver calls on a SIGSTOPped process time out (GpuTimeout); after SIGCONT it is fine."""
    target = wl.cuda_pids[-1]
    quick = GpuTimeouts(lock_s=2.0, grace_s=5.0, quick_s=5.0)
    gc = GpuCheckpointer.open(timeouts=quick)
    out: dict = {"target": target}

    def attempt(name, call):
        t0 = time.monotonic()
        try:
            out[name] = f"returned {call()!r}"
        except GpuError as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
        out[name + "_s"] = round(time.monotonic() - t0, 2)

    os.kill(target, signal.SIGSTOP)
    try:
        out["proc_state"] = Path(f"/proc/{target}/stat").read_text().split()[2]
        attempt("state_while_stopped", lambda: gc.state(target))
        attempt("lock_while_stopped", lambda: gc._call("lock", target))
        attempt("suspend_while_stopped", lambda: gc.suspend([target]))
        out["abandoned_workers"] = len(gpu._ABANDONED)
    finally:
        os.kill(target, signal.SIGCONT)
    time.sleep(3)
    try:
        state = gc.state(target)
        out["state_after_cont"] = state.name if state else None
        if state is not CudaState.RUNNING:
            attempt("resume_after_cont", lambda: gc.resume([target]))
            out["state_after_resume"] = gc.state(target).name
    finally:
        gc.close()
    results["watchdog"] = out
    say("watchdog:", json.dumps(out))
    assert out["lock_while_stopped"].startswith("GpuTimeout"), out
    assert out["lock_while_stopped_s"] < 15, out
    assert out["suspend_while_stopped"].startswith("GpuTimeout"), out
    assert_intact(wl, results, "watchdog_verdict")


# ------------------------------------------------------------------------------ script


def find_criu(explicit: str | None = None) -> str | None:
    for candidate in (explicit, os.environ.get("SLURM_MM_CRIU"), str(REPO / ".carry/criu/criu"),
                      "/opt/slurm_mm/criu/sbin/criu"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def machine_facts() -> dict:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return {"gpus": smi.stdout.strip().splitlines(), "kernel": os.uname().release,
            "python": sys.version.split()[0], "thp": thp.read_text().strip() if thp.exists() else None}


def run_all(gb: float, child_gb: float, criu: str | None, pidns: bool, out_dir: Path) -> int:
    results: dict = {"machine": machine_facts()}
    say("machine:", results["machine"])
    become_subreaper()
    gc = GpuCheckpointer.open()
    if gc is None:
        say("no CUDA checkpoint API here; nothing to validate")
        return 2
    results["machine"]["cuda_driver_version"] = gc.driver_version
    wl = Workload(Path(tempfile.mkdtemp(prefix="mm-gpu-", dir="/var/tmp")), gb, child_gb)
    checks = [
        ("driver_facts", lambda: check_driver_facts(wl, gc, results)),
        ("checkpoint_restore", lambda: check_checkpoint_restore(wl, gc, results)),
        ("rollback", lambda: check_rollback(wl, results)),
        ("remapped_restore", lambda: check_remapped_restore(wl, gc, results)),
        ("inventory", lambda: check_inventory(wl, results)),
    ]
    if criu:
        checks.append(("criu_chain", lambda: check_criu_chain(wl, gc, criu, results, "criu_chain")))
    if criu and pidns:
        checks.append(("criu_chain_pidns", lambda: check_pidns_chain(gc, criu, gb / 2, child_gb / 2, results)))
    if criu:
        checks.append(("engine_chain", lambda: check_engine_chain(gc, criu, gb, child_gb, results)))
    checks.append(("watchdog", lambda: check_watchdog(wl, results)))
    if ONLY:
        checks = [c for c in checks if c[0] in ONLY]
    failures = []
    try:
        t0 = time.monotonic()
        wl.wait_ready()
        results["workload_ready_s"] = round(time.monotonic() - t0, 1)
        results["workload_status"] = [wl.status(c) for c in wl.paths()]
        say("workloads ready:", results["workload_status"])
        for name, check in checks:
            say(f"=== {name}")
            t0 = time.monotonic()
            try:
                check()
                say(f"PASS {name} ({time.monotonic() - t0:.1f} s)")
            except Exception as exc:  # noqa: BLE001 - a report: go on with the next check
                failures.append(name)
                results.setdefault("failures", {})[name] = f"{type(exc).__name__}: {exc}"
                say(f"FAIL {name}: {type(exc).__name__}: {exc}")
    finally:
        wl.stop()
        gc.close()
        results["failed"] = failures
        (out_dir / "validate_gpu.json").write_text(json.dumps(results, indent=1, default=str))
        try:
            (out_dir / "workload.log").write_bytes((wl.workdir / "workload.log").read_bytes()[-20000:])
        except OSError:
            pass
    say("failures:", failures or "none")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=8.0)
    parser.add_argument("--child-gb", type=float, default=2.0)
    parser.add_argument("--criu", default=None, help="CRIU binary for the full chain (default: look for one)")
    parser.add_argument("--no-criu", action="store_true")
    parser.add_argument("--no-pidns", action="store_true", help="skip the chain in a PID + mount namespace")
    parser.add_argument("--only", default="", help="comma-separated check names to run")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    global ONLY
    ONLY = {n for n in args.only.split(",") if n}
    criu = None if args.no_criu else find_criu(args.criu)
    pidns = not args.no_pidns
    return run_all(args.gb, args.child_gb, criu, pidns, Path(args.out))


# ------------------------------------------------------------------------------ pytest

try:
    import pytest
except ImportError:  # script mode without pytest
    pytest = None

if pytest is not None:
    pytestmark = pytest.mark.gpu

    def _skip_reason() -> str | None:
        checkpointer = GpuCheckpointer.open()
        if checkpointer is None:
            return "no NVIDIA GPU with the CUDA checkpoint API on this machine"
        checkpointer.close()
        try:
            import torch  # noqa: F401
        except ImportError:
            return "PyTorch is not installed"
        return None

    @pytest.fixture(scope="module")
    def gpu_env():
        reason = _skip_reason()
        if reason:
            pytest.skip(reason)
        become_subreaper()
        gc = GpuCheckpointer.open()
        gb = float(os.environ.get("SLURM_MM_GPU_GB", "8"))
        wl = Workload(Path(tempfile.mkdtemp(prefix="mm-gpu-", dir="/var/tmp")), gb, gb / 4)
        try:
            wl.wait_ready()
            yield wl, gc
        finally:
            wl.stop()
            gc.close()

    def test_driver_answers_for_cuda_and_plain_processes(gpu_env):
        check_driver_facts(*gpu_env, {})

    def test_checkpoint_frees_gpu_and_restore_keeps_data(gpu_env):
        check_checkpoint_restore(*gpu_env, {})

    def test_failed_checkpoint_rolls_back_and_job_keeps_running(gpu_env):
        check_rollback(gpu_env[0], {})

    def test_restore_with_gpu_uuid_map(gpu_env):
        check_remapped_restore(*gpu_env, {})

    def test_inventory_from_nvml_and_nvidia_smi_agree(gpu_env):
        check_inventory(gpu_env[0], {})

    def test_criu_dump_and_restore_keep_gpu_data(gpu_env):
        criu = find_criu()
        if criu is None:
            pytest.skip("no CRIU binary (set SLURM_MM_CRIU)")
        check_criu_chain(*gpu_env, criu, {}, "criu_chain")

    def test_criu_restore_into_new_pid_and_mount_namespace_keeps_gpu_data(gpu_env):
        criu = find_criu()
        if criu is None:
            pytest.skip("no CRIU binary (set SLURM_MM_CRIU)")
        check_pidns_chain(gpu_env[1], criu, gpu_env[0].gb / 2, gpu_env[0].child_gb / 2, {})

    def test_engine_checkpoint_tree_and_restore_tree_keep_gpu_data(gpu_env):
        criu = find_criu()
        if criu is None:
            pytest.skip("no CRIU binary (set SLURM_MM_CRIU)")
        check_engine_chain(gpu_env[1], criu, gpu_env[0].gb, gpu_env[0].child_gb, {})

    def test_call_on_stopped_process_times_out_and_process_survives(gpu_env):
        check_watchdog(gpu_env[0], {})


if __name__ == "__main__":
    sys.exit(main())
