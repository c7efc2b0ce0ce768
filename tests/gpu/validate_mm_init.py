"""GPU jobs launched by mm-init, validated on a real NVIDIA GPU (run on the GPU machine).

    python3 tests/gpu/validate_mm_init.py [--gb 6] [--child-gb 1] [--user mmgpu]
        [--libexec DIR] [--criu PATH] [--out DIR]

What it checks, in order (each step's numbers go to validate_mm_init.json under --out):

1. cuda_in_pidns: CUDA initialises under `mm-init --private-proc` and not without it
   (error 304: a PID namespace whose /proc is the host's).
2. cpu_precheck: a small CPU tree under --private-proc: checkpoint_tree, restore_tree,
   then a checkpoint of the restored tree (its new stdout is an external file) and a
   second restore. If CRIU's default mount engine cannot restore the tree, the rest
   runs with `--mntns-compat-mode` and the report says so.
3. engine_chain: gpu_workload.py (--gb + --child-gb of GPU memory, self-checking) started
   by `launch(..., private_proc=True)` as an ordinary user (created with useradd if
   missing; root with allow_root only if that user cannot use PyTorch, and the report
   says so), in a cgroup of its own; checkpoint_tree with a GpuCheckpointer: periodic
   (leave_running), then final (tree killed); restore_tree (new stdout, owner check,
   another cgroup); a periodic checkpoint of the restored tree. The workload checks every
   element of its GPU data and its GPU counter against its CPU counter after each step.
4. suspend_flow: Slurm's SUSPEND,GANG preemption on the restored tree: GPU suspend (lock +
   checkpoint into host memory) while it runs, cgroup v2 freeze, GPU memory read while
   frozen (nvidia-smi), thaw, GPU resume (restore + unlock), data intact, job goes on.

Every wait is bounded. Needs root, CRIU (`--criu`, $SLURM_MM_CRIU, .carry/criu/criu)
and mm-init + libmm_prlimit.so (`--libexec`, .carry/libexec, or slurm_mm/native).
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from validate_gpu import REPO, find_criu, gpu_memory_used_mib, machine_facts, say, wait_for  # noqa: E402

from slurm_mm.engine import Criu, checkpoint_tree, launch, proctree, restore_tree  # noqa: E402
from slurm_mm.engine import gpu as gpu_mod  # noqa: E402
from slurm_mm.engine.gpu import CudaState, GpuCheckpointer  # noqa: E402
from slurm_mm.errors import RestoreFailed  # noqa: E402

WORKLOAD = Path(__file__).with_name("gpu_workload.py")
CGROUP2 = Path("/sys/fs/cgroup")


class RecordingCheckpointer(GpuCheckpointer):
    """A GpuCheckpointer that keeps each suspend/resume's driver timings (lock, checkpoint, ...)."""

    calls: list

    def suspend(self, pids):
        try:
            return super().suspend(pids)
        finally:
            self.calls.append({"suspend": dict(self.last_timings)})

    def resume(self, pids, **kw):
        try:
            return super().resume(pids, **kw)
        finally:
            self.calls.append({"resume": dict(self.last_timings)})

    def take(self) -> list:
        calls, self.calls = self.calls, []
        return calls


def find_libexec(explicit: str | None) -> Path:
    for candidate in (explicit, REPO / ".carry/libexec", REPO / "slurm_mm/native"):
        if candidate and (Path(candidate) / "mm-init").is_file():
            return Path(candidate)
    subprocess.run(["make", "-s", "-C", str(REPO / "slurm_mm/native")], check=True, timeout=120)
    return REPO / "slurm_mm/native"


def job_env(user: pwd.struct_passwd) -> dict[str, str]:
    """The launching environment minus what must not reach a job, as the user."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "OUT", "PYTHONPATH")}
    env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name, PYTHONUNBUFFERED="1")
    return env


def open_append(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


def pick_user(name: str) -> tuple[pwd.struct_passwd, str]:
    """The job user, and why it is root if it is."""
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=False, timeout=30,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            return pwd.getpwuid(0), f"useradd {name} failed"
    probe = subprocess.run(
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", sys.executable, "-c",
         "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"],
        capture_output=True, text=True, timeout=120, env=job_env(user), cwd="/",
    )
    if probe.returncode != 0:
        return pwd.getpwuid(0), f"{name} cannot use PyTorch: rc {probe.returncode} {probe.stderr[-300:]!r}"
    return user, ""


def make_cgroup(name: str) -> Path:
    path = CGROUP2 / name
    path.mkdir(exist_ok=True)
    return path


def remove_cgroup(path: Path) -> None:
    deadline = time.monotonic() + 10
    while path.exists() and time.monotonic() < deadline:
        try:
            (path / "cgroup.freeze").write_text("0")
            path.rmdir()
        except OSError:
            time.sleep(0.2)


class GpuJob:
    """gpu_workload.py under mm-init --private-proc, as `user`, stdout/stderr one O_APPEND file."""

    def __init__(self, base: Path, user: pwd.struct_passwd, gb: float, child_gb: float, libexec: Path) -> None:
        self.dir = base / "job"
        self.dir.mkdir(mode=0o755)
        shutil.copy(WORKLOAD, self.dir / WORKLOAD.name)
        for p in (self.dir, self.dir / WORKLOAD.name):
            os.chown(p, user.pw_uid, user.pw_gid)
        self.user, self.gb, self.child_gb, self.libexec = user, gb, child_gb, libexec
        self.status_path = self.dir / "status.json"
        self.tree = None  # LaunchedTree, then RestoredTree
        self._cuda_ns: list[int] = []
        self.fds: list[int] = []

    def output(self, name: str) -> int:
        fd = open_append(self.dir / name)
        self.fds.append(fd)
        return fd

    def start(self, cgroup: Path) -> None:
        out = self.output("out.log")
        argv = [sys.executable, str(self.dir / WORKLOAD.name), "--gb", str(self.gb), "--child-gb",
                str(self.child_gb), "--status", str(self.status_path)]
        self.tree = launch(argv, uid=self.user.pw_uid, gid=self.user.pw_gid, env=job_env(self.user),
                           cwd=self.dir, stdout=out, stderr=out, join_cgroups=[cgroup],
                           allow_root=self.user.pw_uid == 0, private_proc=True, libexec=self.libexec)

    @property
    def init_pid(self) -> int:
        return self.tree.init_pid

    def pids(self) -> list[int]:
        return proctree.tree_pids(self.init_pid)

    def status(self, child: bool = False) -> dict:
        try:
            return json.loads(Path(str(self.status_path) + (".child" if child else "")).read_text())
        except (OSError, ValueError):
            return {}

    def paths(self) -> list[bool]:
        return [False, True] if self.child_gb > 0 else [False]

    def iters(self) -> list[int]:
        return [self.status(c).get("iters", 0) for c in self.paths()]

    def wait_ready(self, timeout: float = 240) -> float:
        t0 = time.monotonic()

        def ready():
            if self.tree.poll() is not None:
                raise AssertionError(f"job ended ({self.tree.poll()}): {(self.dir / 'out.log').read_text()[-2000:]}")
            return all(self.status(c).get("iters") for c in self.paths())

        wait_for(ready, timeout, "GPU job ready")
        self._cuda_ns = [proctree.ns_pid(p) for p in self.pids() if gpu_mod.nvidia_files(p)]
        return time.monotonic() - t0

    @property
    def cuda_pids(self) -> list[int]:
        by_ns = {proctree.ns_pid(p): p for p in self.pids()}
        return sorted(by_ns[n] for n in self._cuda_ns if n in by_ns)

    def verify(self, timeout: float = 120) -> list[dict]:
        """The job checks its own data: every element of its pattern, GPU vs CPU counter."""
        seqs = [self.status(c).get("verify_seq", 0) for c in self.paths()]
        os.kill(self.init_pid, signal.SIGUSR1)  # mm-init relays it to the app's process group
        wait_for(lambda: all(self.status(c).get("verify_seq", 0) > s for c, s in zip(self.paths(), seqs)),
                 timeout, "self-verification")
        keys = ("pid", "data_ok", "bad_elements", "gpu_counter", "cpu_counter", "verify_s")
        return [{k: self.status(c).get(k) for k in keys} for c in self.paths()]

    def intact(self, results: dict, key: str) -> None:
        verdicts = self.verify()
        results[key] = verdicts
        say(f"{key}:", verdicts)
        assert all(v["data_ok"] and v["gpu_counter"] == v["cpu_counter"] for v in verdicts), verdicts
        before = self.iters()
        wait_for(lambda: all(a > b for a, b in zip(self.iters(), before)), 30, "the job to go on")

    def stop(self) -> None:
        if self.tree is not None:
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            self.tree.kill()
            try:
                self.tree.wait(20)
            except Exception:  # noqa: BLE001 - cleanup only
                pass
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


# ------------------------------------------------------------------------- the checks


def check_cuda_in_pidns(user: pwd.struct_passwd, libexec: Path, base: Path, results: dict) -> None:
    """torch.ones(1, device='cuda') with and without --private-proc (error 304 without)."""
    code = "import torch; torch.ones(1, device='cuda'); print('cuda ok')"
    out: dict = {}
    trees = {}
    for private in (False, True):
        log = base / f"cuda-{private}.log"
        fd = open_append(log)
        try:
            trees[private] = (launch([sys.executable, "-c", code], uid=user.pw_uid, gid=user.pw_gid,
                                     env=job_env(user), stdout=fd, stderr=fd, allow_root=user.pw_uid == 0,
                                     private_proc=private, libexec=libexec), log)
        finally:
            os.close(fd)
    for private, (tree, log) in trees.items():
        rc = tree.wait(120)
        text = log.read_text()
        out[f"private_proc={private}"] = {"rc": rc, "output_tail": text[-400:]}
    results["cuda_in_pidns"] = out
    say("cuda_in_pidns:", json.dumps(out))
    assert out["private_proc=True"]["rc"] == 0 and "cuda ok" in out["private_proc=True"]["output_tail"], out


def check_cpu_precheck(user: pwd.struct_passwd, criu: Criu, libexec: Path, base: Path, results: dict) -> None:
    """The mount-namespace chain on a small CPU tree; picks the mount engine for the rest."""
    work = base / "cpu"
    work.mkdir(mode=0o755)
    os.chown(work, user.pw_uid, user.pw_gid)
    out_fd = open_append(work / "out.log")
    tree = launch(["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done"], uid=user.pw_uid,
                  gid=user.pw_gid, stdout=out_fd, stderr=out_fd, allow_root=user.pw_uid == 0,
                  private_proc=True, libexec=libexec)
    os.close(out_fd)
    out: dict = {}
    try:
        time.sleep(0.5)
        first = checkpoint_tree(tree.init_pid, work / "img1", leave_running=False, criu=criu)
        out["dump1"] = {"mount_ns": first.mount_ns, "external": first.external_files, "timings": first.timings}
        tree.wait(10)
        wait_for(lambda: proctree.wait_gone(first.pids, 0, zombies_count=False) == [], 10, "dumped CPU tree gone")
        new = open_append(work / "new1.log")
        owner = user.pw_uid if user.pw_uid else None
        try:
            restored = restore_tree(work / "img1", stdout=new, stderr=new, criu=criu, owner_uid=owner)
            out["engine"] = "mount-v2 (CRIU default) with --root /"
        except RestoreFailed as exc:
            out["mount_v2_error"] = f"{exc} | {exc.log_excerpt[-600:]}"
            say("mount-v2 restore failed, retrying with --mntns-compat-mode:", exc)
            criu.mntns_compat_mode = True
            restored = restore_tree(work / "img1", stdout=new, stderr=new, criu=criu, owner_uid=owner)
            out["engine"] = "--mntns-compat-mode with --root /"
        finally:
            os.close(new)
        time.sleep(0.3)
        second = checkpoint_tree(restored.init_pid, work / "img2", leave_running=False, criu=criu)
        out["dump2"] = {"external": second.external_files, "timings": second.timings}
        restored.wait(10)
        wait_for(lambda: proctree.wait_gone(second.pids, 0, zombies_count=False) == [], 10, "CPU tree gone")
        new = open_append(work / "new2.log")
        try:
            again = restore_tree(work / "img2", stdout=new, stderr=new, criu=criu, owner_uid=owner)
        finally:
            os.close(new)
        time.sleep(0.3)
        again.kill()
        again.wait(10)
        counts = [int((work / n).read_text().split()[k]) for n, k in
                  (("out.log", -1), ("new1.log", 0), ("new1.log", -1), ("new2.log", 0))]
        out["counter_out_new1_new2"] = counts
        out["cr_tmpfs_left_in_tmp"] = sorted(p.name for p in Path("/tmp").glob("cr-tmpfs.*"))
    finally:
        results["cpu_precheck"] = out
        say("cpu_precheck:", json.dumps(out))
    assert first.mount_ns and not first.external_files and second.external_files, out
    assert counts[1] == counts[0] + 1 and counts[3] == counts[2] + 1, out


def check_engine_chain(job: GpuJob, gc: GpuCheckpointer, criu: Criu, cg_launch: Path, cg_restore: Path,
                       images: Path, results: dict) -> None:
    out: dict = {"user": job.user.pw_name, "uid": job.user.pw_uid}
    results["engine_chain"] = out
    t0 = time.monotonic()
    job.start(cg_launch)
    job.wait_ready()
    out["ready_s"] = round(time.monotonic() - t0, 1)
    out["tree"] = {p: proctree.ns_pid(p) for p in job.pids()}
    out["cuda_pids"] = job.cuda_pids
    out["gpu_mem_used_mib_running"] = gpu_memory_used_mib()
    say("GPU job ready:", json.dumps(out))
    assert len(job.cuda_pids) == len(job.paths())
    job.intact(results, "verdict_launched")

    periodic = checkpoint_tree(job.init_pid, images / "periodic", leave_running=True, gpu=gc, criu=criu)
    out["periodic"] = {"gpu_pids": periodic.gpu_pids, "mount_ns": periodic.mount_ns,
                       "timings": periodic.timings, "image_mib": periodic.image_bytes >> 20,
                       "gpu_calls": gc.take()}
    say("periodic checkpoint:", json.dumps(out["periodic"]))
    assert periodic.mount_ns and sorted(periodic.gpu_pids) == job.cuda_pids
    job.intact(results, "verdict_after_periodic")
    shutil.rmtree(images / "periodic")

    pids = job.pids()
    final = checkpoint_tree(job.init_pid, images / "final", leave_running=False, gpu=gc, criu=criu)
    out["final"] = {"gpu_pids": final.gpu_pids, "timings": final.timings, "image_mib": final.image_bytes >> 20,
                    "gpu_calls": gc.take()}
    say("final checkpoint:", json.dumps(out["final"]))
    out["launched_exit"] = job.tree.wait(30)
    wait_for(lambda: proctree.wait_gone(pids, 0, zombies_count=False) == [], 30, "checkpointed tree gone")
    out["gpu_mem_used_mib_after_kill"] = gpu_memory_used_mib()

    new = job.output("restored.log")
    owner = job.user.pw_uid if job.user.pw_uid else None
    try:
        job.tree = restore_tree(images / "final", stdout=new, stderr=new, join_cgroups=[cg_restore],
                                owner_uid=owner, gpu=gc, criu=criu)
    except RestoreFailed as exc:
        if criu.mntns_compat_mode:
            raise
        out["mount_v2_restore_error"] = f"{exc} | {exc.log_excerpt[-600:]}"
        say("mount-v2 restore of the GPU tree failed, retrying with --mntns-compat-mode:", exc)
        criu.mntns_compat_mode = True
        job.tree = restore_tree(images / "final", stdout=new, stderr=new, join_cgroups=[cg_restore],
                                owner_uid=owner, gpu=gc, criu=criu)
    out["restore"] = {"init_pid": job.init_pid, "ns_pids": job.tree.ns_pids, "gpu_pids": job.tree.gpu_pids,
                      "timings": job.tree.timings, "gpu_calls": gc.take(),
                      "mntns_compat_mode": criu.mntns_compat_mode}
    say("restored:", json.dumps(out["restore"]))
    assert sorted(job.tree.gpu_pids) == job.cuda_pids and len(job.tree.gpu_pids) == len(job.paths())
    job.intact(results, "verdict_restored")
    shutil.rmtree(images / "final")

    again = checkpoint_tree(job.init_pid, images / "again", leave_running=True, gpu=gc, criu=criu)
    out["restored_periodic"] = {"gpu_pids": again.gpu_pids, "external_files": again.external_files,
                                "timings": again.timings, "image_mib": again.image_bytes >> 20,
                                "gpu_calls": gc.take()}
    say("periodic checkpoint of the restored tree:", json.dumps(out["restored_periodic"]))
    assert again.external_files, "the restored tree's new stdout is outside its mount namespace"
    job.intact(results, "verdict_restored_periodic")
    shutil.rmtree(images / "again")


def check_suspend_flow(job: GpuJob, gc: GpuCheckpointer, cgroup: Path, results: dict) -> None:
    """SUSPEND,GANG: GPU suspend -> freeze -> (GPU memory free) -> thaw -> GPU resume."""
    out: dict = {"cgroup": str(cgroup)}
    results["suspend_flow"] = out
    procs = sorted(int(p) for p in (cgroup / "cgroup.procs").read_text().split())
    out["tree_in_cgroup"] = sorted(job.pids()) == procs
    out["gpu_mem_used_mib_running"] = gpu_memory_used_mib()
    t0 = time.monotonic()
    suspended = gc.suspend(job.pids())
    out["gpu_suspend_s"] = round(time.monotonic() - t0, 2)
    out["gpu_suspend_timings"] = dict(gc.last_timings)
    out["gpu_mem_used_mib_suspended"] = gpu_memory_used_mib()
    out["states_suspended"] = {p: gc.state(p).name for p in suspended}
    t0 = time.monotonic()
    (cgroup / "cgroup.freeze").write_text("1")
    wait_for(lambda: "frozen 1" in (cgroup / "cgroup.events").read_text(), 10, "cgroup frozen", interval=0.01)
    out["freeze_s"] = round(time.monotonic() - t0, 3)
    iters = job.iters()
    time.sleep(3)
    out["iters_while_frozen"] = [iters, job.iters()]
    out["gpu_mem_used_mib_frozen"] = gpu_memory_used_mib()
    out["proc_states_frozen"] = {p: proctree.task_ids(p).state for p in job.pids()}
    out["nvidia_files_frozen"] = {p: gpu_mod.nvidia_files(p) for p in suspended}
    t0 = time.monotonic()
    (cgroup / "cgroup.freeze").write_text("0")
    wait_for(lambda: "frozen 0" in (cgroup / "cgroup.events").read_text(), 10, "cgroup thawed", interval=0.01)
    out["thaw_s"] = round(time.monotonic() - t0, 3)
    t0 = time.monotonic()
    resumed = gc.resume(suspended)
    out["gpu_resume_s"] = round(time.monotonic() - t0, 2)
    out["gpu_resume_timings"] = dict(gc.last_timings)
    out["gpu_mem_used_mib_resumed"] = gpu_memory_used_mib()
    out["states_resumed"] = {p: gc.state(p).name for p in resumed}
    say("suspend flow:", json.dumps(out))
    assert out["tree_in_cgroup"], (procs, job.pids())
    assert sorted(suspended) == job.cuda_pids and sorted(resumed) == job.cuda_pids
    assert all(s == "CHECKPOINTED" for s in out["states_suspended"].values())
    assert out["iters_while_frozen"][0] == out["iters_while_frozen"][1]
    assert all(gc.state(p) is CudaState.RUNNING for p in job.cuda_pids)
    job.intact(results, "verdict_after_suspend")


# ------------------------------------------------------------------------------ script


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=6.0)
    parser.add_argument("--child-gb", type=float, default=1.0)
    parser.add_argument("--user", default="mmgpu")
    parser.add_argument("--libexec", default=None)
    parser.add_argument("--criu", default=None)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    out_dir = Path(args.out)
    results: dict = {"machine": machine_facts()}
    libexec = find_libexec(args.libexec)
    criu_path = find_criu(args.criu)
    if criu_path is None:
        say("no CRIU")
        return 2
    criu = Criu(criu_path, libexec=libexec)
    results["criu"] = {"path": criu_path, "version": criu.version(), "prlimit_shim": str(criu.prlimit_shim)}
    gc = RecordingCheckpointer.open()
    if gc is None:
        say("no CUDA checkpoint API here")
        return 2
    gc.calls = []
    user, why_root = pick_user(args.user)
    results["user"] = {"name": user.pw_name, "uid": user.pw_uid, "why_root": why_root}
    say("machine:", json.dumps(results["machine"]), "user:", json.dumps(results["user"]))
    base = Path(tempfile.mkdtemp(prefix="mm-init-gpu-", dir="/var/tmp"))
    base.chmod(0o755)
    images = base / "images"
    images.mkdir(mode=0o700)
    cg_launch, cg_restore = make_cgroup("mm-gpu-launch"), make_cgroup("mm-gpu-restore")
    job = GpuJob(base, user, args.gb, args.child_gb, libexec)
    failures: list[str] = []
    checks = [
        ("cuda_in_pidns", lambda: check_cuda_in_pidns(user, libexec, base, results)),
        ("cpu_precheck", lambda: check_cpu_precheck(user, criu, libexec, base, results)),
        ("engine_chain", lambda: check_engine_chain(job, gc, criu, cg_launch, cg_restore, images, results)),
        ("suspend_flow", lambda: check_suspend_flow(job, gc, cg_restore, results)),
    ]
    try:
        for name, check in checks:
            if name == "suspend_flow" and "engine_chain" in failures:
                say("SKIP suspend_flow: no restored GPU job")
                continue
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
        job.stop()
        gc.close()
        for cg in (cg_launch, cg_restore):
            remove_cgroup(cg)
        results["failed"] = failures
        (out_dir / "validate_mm_init.json").write_text(json.dumps(results, indent=1, default=str))
        for name in ("out.log", "restored.log"):
            try:
                (out_dir / f"job-{name}").write_bytes((job.dir / name).read_bytes()[-20000:])
            except OSError:
                pass
        subprocess.run(["rm", "-rf", str(base)], timeout=120, check=False)
    say("failures:", failures or "none")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
