#!/usr/bin/env python3
"""GPU jobs under real Slurm with slurm_mm: the whole validation scenario, self-judged.

On slurm_gpu_cluster.py's cluster (three slurmd sharing one GPU), train_job.py runs as
the unprivileged test user and proves, against an uninterrupted run of itself started
outside Slurm at the same time (the reference):
  requeue   job A (low, --gres=gpu:1, periodic checkpoints) is preempted by a high job
            that wants its node's GPU: checkpointed in the grace time, requeued,
            restored on another node, and ends with the reference's weights;
  scancel   job C is checkpointed and requeued by its owner (`slurm-mm checkpoint
            --requeue`), restored, then scancel'ed: Slurm says CANCELLED, its
            processes and their GPU memory are gone;
  steps     job D's script runs the training as an `srun` step (`srun python train_job.py`):
            its step task's GPU memory is in its periodic images, it is preempted to
            another node and its step restored there, and it ends with the reference's
            weights;
  suspend   (cluster restarted with PreemptMode=SUSPEND,GANG) job B is suspended by a
            high job: its GPU memory is released while it is suspended (nvidia-smi),
            it makes no progress, and after the resume it ends with the reference's weights.
Every observation, timing and verdict goes to OUT/report.json; the exit status is 0 only
if every check passed. Without a GPU (dry run on the CPU machine) the same flow runs
with the plain-Python workload and the GPU checks are reported as skipped.

    slurm_gpu_scenario.py --out DIR [--python PY] [--steps N] [--phases requeue,steps,suspend]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slurm_gpu_cluster as gc  # noqa: E402

tc = gc.tc
T0 = time.time()
WORKLOAD = Path(__file__).resolve().parent / "train_job.py"


def log(text: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {text}", flush=True)


class Report:
    """report.json, rewritten after every step so a killed run still leaves its findings."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict = {"checks": [], "timings": {}, "observations": {}}

    def check(self, name: str, ok: bool | None, detail: object = "") -> bool:
        verdict = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        self.data["checks"].append({"name": name, "verdict": verdict, "detail": detail})
        log(f"{verdict} {name}: {detail}")
        self.save()
        return bool(ok)

    def note(self, section: str, key: str, value: object) -> None:
        self.data.setdefault(section, {})[key] = value
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1, default=str))

    def failures(self) -> list[str]:
        return [c["name"] for c in self.data["checks"] if c["verdict"] == "FAIL"]


# ---------------------------------------------------------------- observations

def gpu_snapshot() -> dict | None:
    """GPU memory in use and the compute processes nvidia-smi sees (None: no GPU)."""
    if not shutil.which("nvidia-smi") or not gc.has_gpu():
        return None
    used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, timeout=30).stdout.split()
    apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                           "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
    procs = {}
    for line in apps.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            procs[int(parts[0])] = int(parts[1]) if parts[1].isdigit() else parts[1]
    return {"t": round(time.time() - T0, 2), "used_mib": int(used[0]) if used else None, "apps": procs}


def job_pids(marker: str) -> list[int]:
    """Host PIDs of the test user's processes whose command line holds `marker`."""
    out = subprocess.run(["pgrep", "-u", tc.USER, "-f", marker], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def progress(out: Path) -> list[tuple[float, int, int]]:
    """(wall time, step, gpu_step) of each progress line the job printed."""
    rows = []
    if out.exists():
        for line in out.read_text(errors="replace").splitlines():
            m = re.match(r"(\d+\.\d+) step=(\d+) gpu_step=(\d+)", line)
            if m:
                rows.append((float(m[1]), int(m[2]), int(m[3])))
    return rows


def slurm_time(text: str | None) -> float | None:
    try:
        return dt.datetime.strptime(text or "", "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        return None


def agent_events(c, pattern: str) -> list[tuple[float, str]]:
    """(time, line) of every agent log line matching `pattern`, all nodes."""
    found = []
    for path in sorted(c.log.glob("agent-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if re.search(pattern, line):
                try:
                    t = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                except ValueError:
                    continue
                found.append((t, f"{path.stem}: {line[24:]}"))
    return sorted(found)


class ImageWatch(threading.Thread):
    """Notes when each committed image (ckpt-*) first appears: the moment it is durable."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.seen: dict[str, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            for path in self.root.glob("*/ckpt-*"):
                self.seen.setdefault(f"{path.parent.name}/{path.name}", time.time())


def image_facts(c, job: str, watch: ImageWatch) -> list[dict]:
    from slurm_mm.store import ImageStore  # noqa: PLC0415

    facts = []
    for image in reversed(ImageStore(c.checkpoint_root).images(job)):
        m = image.manifest
        timings = m.extra.get("timings", {})
        start = m.created - timings.get("total", 0.0)  # commit starts right after the dump
        # Listed here before the watcher's next poll: it is durable by now.
        seen = watch.seen.setdefault(f"{job}/{image.path.name}", time.time()) if watch else None
        facts.append({
            "image": image.path.name, "trigger": m.trigger, "epoch": m.epoch, "node": m.node,
            "gpu_pids": m.extra.get("gpu_pids"), "timings_s": {k: round(v, 2) for k, v in timings.items()},
            "image_bytes": m.extra.get("image_bytes"), "stored_bytes": m.stored_size,
            "durable_after_s": round(seen - start, 2) if seen else None,
            "commit_s": round(seen - m.created, 2) if seen else None,
            "gpu": bool(m.gpu),
            "step_gpu_ranks": {token[:6]: sorted((meta.get("gpu") or {}))
                               for token, meta in (m.extra.get("steps") or {}).items()}})
    return facts


# ---------------------------------------------------------------- jobs

class Scenario:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.c = tc.Cluster(args.state_dir)
        self.report = Report(args.out / "report.json")
        self.gpu = gc.has_gpu()
        tc.ensure_user()
        self.dir = Path(pwd.getpwnam(tc.USER).pw_dir) / "gpu-slurm"
        self.watch: ImageWatch | None = None
        self.known: dict[str, dict[str, dict]] = {}  # job -> image -> facts (kept after gc)

    def images(self, job: str) -> list[dict]:
        """Facts of the job's images now in the store, remembered for the report."""
        facts = image_facts(self.c, job, self.watch)
        for f in facts:
            self.known.setdefault(job, {})[f["image"]] = f
        self.report.note("images", job, list(self.known.get(job, {}).values()))
        return facts

    def prepare(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        shutil.copy(WORKLOAD, self.dir / "train_job.py")
        pw = pwd.getpwnam(tc.USER)
        for p in (self.dir, self.dir / "train_job.py"):
            os.chown(p, pw.pw_uid, pw.pw_gid)

    def command(self, name: str, ballast: float) -> str:
        a = self.args
        return (f"{a.python} {self.dir}/train_job.py --steps {a.steps} --sleep {a.sleep} "
                f"--report {a.report} --ballast-gb {ballast} --result {self.dir}/{name}.json")

    @staticmethod
    def preamble() -> str:
        """The machine's library path (where libcuda may live), for jobs started with env -i."""
        path = os.environ.get("LD_LIBRARY_PATH", "")
        return f"export LD_LIBRARY_PATH='{path}'\n" if path and "'" not in path else ""

    def submit(self, name: str, ballast: float, interval: str, partition: str = "low", srun: bool = False) -> str:
        script = f"#!/bin/bash\n{self.preamble()}exec {self.command(name, ballast)}\n"
        if srun:  # the usual GPU batch script: the training is a step, the script waits on it
            script = f"#!/bin/bash\n{self.preamble()}srun {self.command(name, ballast)}\necho \"step exit $?\"\n"
        opts = ["-p", partition, "-J", name, "-o", str(self.dir / f"{name}.out"),
                f"--checkpoint-interval={interval}"]
        if self.gpu:
            opts.append("--gres=gpu:1")
        job = tc.job_id(tc.sbatch(self.c, script, *opts, cwd=self.dir))
        log(f"submitted {name} as job {job}")
        return job

    def urgent(self, node: str, seconds: int, gres: bool) -> str:
        opts = ["-p", "high", "-w", node, "-J", "urgent", "-o", "/dev/null"]
        # Not --exclusive when suspending: that asks for the node's GRES too, which a
        # suspended job keeps, so Slurm would never preempt for it.
        opts += ["--gres=gpu:1"] if gres and self.gpu else [f"--cpus-per-task={self.args.cpus}"]
        job = tc.job_id(tc.sbatch(self.c, f"#!/bin/sh\nsleep {seconds}\n", *opts, cwd=self.dir))
        log(f"submitted urgent job {job} on {node} ({opts[-1]})")
        return job

    def out(self, name: str) -> Path:
        return self.dir / f"{name}.out"

    def result(self, name: str) -> dict | None:
        try:
            return json.loads((self.dir / f"{name}.json").read_text())
        except (OSError, ValueError):
            return None

    def wait_restarts(self, job: str, restarts: int, timeout: float) -> dict:
        info: dict = {}

        def running_again() -> bool:
            nonlocal info
            info = tc.job_info(self.c, job)
            return info.get("JobState") == "RUNNING" and info.get("Restarts") == str(restarts)
        tc.wait_for(running_again, timeout, f"job {job} running with {restarts} restart(s)", interval=0.5)
        return info

    def wait_progress_after(self, name: str, t: float, timeout: float) -> tuple[float, int, int]:
        tc.wait_for(lambda: any(r[0] > t for r in progress(self.out(name))), timeout,
                    f"{name} to make progress")
        return next(r for r in progress(self.out(name)) if r[0] > t)

    def as_user(self, *argv: str) -> subprocess.CompletedProcess:
        env = {"PATH": f"{tc.PREFIX / 'venv' / 'bin'}:/usr/bin:/bin", "SLURM_CONF": str(self.c.slurm_conf),
               "SLURM_MM_CONFIG": str(self.c.mm_config), "HOME": str(self.dir.parent)}
        return subprocess.run(["runuser", "-u", tc.USER, "--", "env", "-i",
                               *(f"{k}={v}" for k, v in env.items()), *argv],
                              capture_output=True, text=True, timeout=300, cwd="/")

    def poll_images(self, job: str) -> bool:
        """Remember the job's images while it runs (the epilog removes them at its end)."""
        try:
            self.images(job)
        except Exception as exc:  # noqa: BLE001 - a directory removed while listed
            log(f"listing images of {job}: {exc}")
        return True

    # ------------------------------------------------------------ reference

    def start_reference(self) -> subprocess.Popen:
        env = {"PATH": "/usr/bin:/bin", "HOME": str(self.dir.parent), "LANG": "C.UTF-8"}
        out = open(self.out("ref"), "ab")
        os.chown(self.out("ref"), *[getattr(pwd.getpwnam(tc.USER), k) for k in ("pw_uid", "pw_gid")])
        proc = subprocess.Popen(["runuser", "-u", tc.USER, "--", "env", "-i",
                                 *(f"{k}={v}" for k, v in env.items()), "sh", "-c",
                                 f"{self.preamble()}exec {self.command('ref', 0)}"],
                                stdout=out, stderr=out, cwd=self.dir)
        out.close()
        log(f"reference run started (pid {proc.pid})")
        return proc

    def same_as_reference(self, name: str, reference: dict | None) -> None:
        got = self.result(name)
        self.report.note("results", name, got)
        if got is None or reference is None:
            self.report.check(f"{name}_result", False, f"result {got is not None}, reference {reference is not None}")
            return
        self.report.check(f"{name}_self_checks", got.get("ok") is True,
                          {k: got.get(k) for k in ("gpu_step", "counters_ok", "ballast_ok", "ballast_bad_elements")})
        self.report.check(f"{name}_same_weights_as_uninterrupted", got["checksum"] == reference["checksum"],
                          f"{got['checksum'][:16]} vs reference {reference['checksum'][:16]}")

    def steps_continuous(self, name: str, restart_t: float | None = None) -> None:
        steps = [r[1] for r in progress(self.out(name))]
        expected = list(range(self.args.report, self.args.steps + 1, self.args.report))
        if self.args.steps % self.args.report:
            expected.append(self.args.steps)
        self.report.check(f"{name}_no_step_lost_or_repeated", steps == expected,
                          f"{len(steps)} progress lines, first {steps[:3]}, last {steps[-3:]}")

    # ------------------------------------------------------------ phases

    def phase_requeue(self, reference_proc: subprocess.Popen) -> None:
        c, r, a = self.c, self.report, self.args
        gc.start(c, "requeue", grace=a.grace, cpus=a.cpus)
        r.note("observations", "cluster_requeue", {"cgroup": gc.cgroup_mode(), "gpu": self.gpu,
                                                   "nodes": tc.node_states(c)})
        self.watch = ImageWatch(c.checkpoint_root)
        self.watch.start()
        job_a = self.submit("A", a.ballast_a, a.interval)
        job_c = self.submit("C", a.ballast_c, a.interval)
        node_a = tc.wait_job(c, job_a, {"RUNNING"}, 60)["BatchHost"]
        node_c = tc.wait_job(c, job_c, {"RUNNING"}, 60)["BatchHost"]
        log(f"A on {node_a}, C on {node_c}")
        tc.wait_for(lambda: len(self.images(job_a)) >= 1, 150, "A's first periodic image")
        r.check("A_periodic_checkpoint", True, self.images(job_a)[-1])
        r.note("observations", "gpu_A_running", gpu_snapshot())
        tc.wait_for(lambda: len(self.images(job_c)) >= 1, 120, "C's first periodic image")

        # Preemption of A by a job that wants A's GPU.
        t_preempt = time.time()
        urgent = self.urgent(node_a, a.urgent_seconds, gres=True)
        # C: checkpoint + requeue by its owner, at the same time.
        t_c = time.time()
        res = self.as_user(str(tc.PREFIX / "venv" / "bin" / "slurm-mm"), "checkpoint", job_c, "--requeue")
        r.check("C_owner_checkpoint_requeue", res.returncode == 0,
                f"rc {res.returncode}: {(res.stdout + res.stderr).strip()[-300:]} ({time.time() - t_c:.1f} s)")

        tc.wait_for(lambda: any(f["trigger"] == "preempt" for f in self.images(job_a)),
                    a.grace + 60, "A's preemption image")
        pre = [f for f in self.images(job_a) if f["trigger"] == "preempt"][-1]
        r.check("A_preempt_checkpoint", True, pre)
        info = self.wait_restarts(job_a, 1, a.grace + 120)
        t_start2 = slurm_time(info.get("StartTime"))
        r.check("A_requeued_and_running_again", True,
                f"on {info.get('BatchHost')} (was {node_a}), {time.time() - t_preempt:.1f} s after the urgent job")
        first = self.wait_progress_after("A", t_start2 or t_preempt, 180)
        restored = agent_events(c, f"job {job_a}: restored from")
        r.check("A_restored_from_image", bool(restored), restored[-1][1] if restored else self.tail("A"))
        r.note("timings", "A_restore", {
            "node_before": node_a, "node_after": info.get("BatchHost"),
            "urgent_submitted_to_A_running_again_s": round((t_start2 or 0) - t_preempt, 1),
            "slurm_start_to_restored_s": round(restored[-1][0] - t_start2, 2) if restored and t_start2 else None,
            "slurm_start_to_first_progress_s": round(first[0] - t_start2, 2) if t_start2 else None,
            "first_step_after_restore": first[1]})
        r.note("observations", "gpu_A_restored", gpu_snapshot())

        # C: restored, then scancel'ed.
        try:
            info_c = self.wait_restarts(job_c, 1, 180)
            t_c2 = slurm_time(info_c.get("StartTime")) or t_c
            self.wait_progress_after("C", t_c2, 180)
            restored_c = agent_events(c, f"job {job_c}: restored from")
            r.check("C_restored_from_image", bool(restored_c), restored_c[-1][1] if restored_c else self.tail("C"))
            pids = job_pids(f"{self.dir}/C.json")
            before = gpu_snapshot()
            t_cancel = time.time()
            subprocess.run(["scancel", job_c], env=c.env(), check=True)
            end = tc.wait_job(c, job_c, {"CANCELLED", "COMPLETED", "FAILED"}, 60)
            tc.wait_for(lambda: not job_pids(f"{self.dir}/C.json"), 30, "C's processes to go")
            gone = time.time() - t_cancel
            after = gpu_snapshot()
            held = [p for p in pids if after and p in after["apps"]]
            r.check("C_scancel_of_restored_job", end["JobState"] == "CANCELLED" and not held,
                    f"state {end['JobState']}, processes {pids} gone {gone:.1f} s after scancel, "
                    f"GPU apps before {before and before['apps']}, after {after and after['apps']}")
        except (TimeoutError, subprocess.CalledProcessError) as exc:
            r.check("C_scancel_of_restored_job", False, f"{exc}; {self.tail('C')}")

        tc.wait_job(c, urgent, {"COMPLETED", "CANCELLED", "FAILED"}, a.urgent_seconds + 60)
        tc.wait_for(lambda: self.poll_images(job_a) and tc.job_info(c, job_a).get("JobState") in
                    ("COMPLETED", "FAILED", "CANCELLED"), a.steps * (a.sleep + 0.05) + 300, "A to end", interval=1)
        end_a = tc.job_info(c, job_a)
        r.check("A_completed", end_a["JobState"] == "COMPLETED",
                f"{end_a['JobState']} exit {end_a.get('ExitCode')} restarts {end_a.get('Restarts')}")
        reference_proc.wait(timeout=max(10, a.steps * (a.sleep + 0.05)))
        reference = self.result("ref")
        r.note("results", "reference", reference)
        self.same_as_reference("A", reference)
        self.steps_continuous("A")
        r.note("observations", "A_out_tail", self.tail("A", 25))
        r.note("observations", "C_out_tail", self.tail("C", 15))

    def phase_steps(self, reference_proc: subprocess.Popen) -> None:
        """Job D: `srun python train_job.py` in a plain bash script, periodic images that hold
        the step task's GPU state, REQUEUE preemption to another node, same final weights."""
        c, r, a = self.c, self.report, self.args
        if not tc.read_pid(c.pid_file("slurmctld")):
            gc.start(c, "requeue", grace=a.grace, cpus=a.cpus)
        if self.watch is None:
            self.watch = ImageWatch(c.checkpoint_root)
            self.watch.start()
        job_d = self.submit("D", a.ballast_a, a.interval, srun=True)
        node_d = tc.wait_job(c, job_d, {"RUNNING"}, 60)["BatchHost"]
        self.wait_progress_after("D", 0, 120)
        tc.wait_for(lambda: any(f["step_gpu_ranks"] for f in self.images(job_d)), 150,
                    "D's first periodic image with its step")
        first = next(f for f in self.images(job_d) if f["step_gpu_ranks"])
        gpu_in_image = first["gpu"] and all(first["step_gpu_ranks"].values()) if self.gpu else None
        r.check("D_step_gpu_state_in_periodic_image", gpu_in_image,
                first if self.gpu else f"no GPU here: {first}")
        r.note("observations", "gpu_D_running", gpu_snapshot())
        t_preempt = time.time()
        urgent = self.urgent(node_d, a.urgent_seconds, gres=True)
        tc.wait_for(lambda: any(f["trigger"] == "preempt" for f in self.images(job_d)),
                    a.grace + 60, "D's preemption image")
        pre = [f for f in self.images(job_d) if f["trigger"] == "preempt"][-1]
        r.check("D_preempt_checkpoint_with_step", bool(pre["step_gpu_ranks"]) and (pre["gpu"] or not self.gpu), pre)
        info = self.wait_restarts(job_d, 1, a.grace + 120)
        t_start2 = slurm_time(info.get("StartTime"))
        moved = info.get("BatchHost") != node_d
        first_after = self.wait_progress_after("D", t_start2 or t_preempt, 180)
        restored = agent_events(c, f"job {job_d}: (restored from|restored task|relaunched step)")
        r.check("D_requeued_to_another_node_and_step_restored",
                moved and any("restored task" in e[1] for e in restored),
                {"node": f"{info.get('BatchHost')} (was {node_d})", "events": [e[1] for e in restored][-4:]})
        r.note("timings", "D_restore", {
            "node_before": node_d, "node_after": info.get("BatchHost"),
            "urgent_submitted_to_D_running_again_s": round((t_start2 or 0) - t_preempt, 1),
            "slurm_start_to_first_progress_s": round(first_after[0] - t_start2, 2) if t_start2 else None,
            "first_step_after_restore": first_after[1]})
        r.note("observations", "gpu_D_restored", gpu_snapshot())
        tc.wait_job(c, urgent, {"COMPLETED", "CANCELLED", "FAILED"}, a.urgent_seconds + 60)
        tc.wait_for(lambda: self.poll_images(job_d) and tc.job_info(c, job_d).get("JobState") in
                    ("COMPLETED", "FAILED", "CANCELLED"), a.steps * (a.sleep + 0.05) + 300, "D to end", interval=1)
        end_d = tc.job_info(c, job_d)
        r.check("D_completed", end_d["JobState"] == "COMPLETED" and "step exit 0" in "\n".join(self.tail("D", 5)),
                f"{end_d['JobState']} exit {end_d.get('ExitCode')} restarts {end_d.get('Restarts')}, "
                f"tail {self.tail('D', 2)}")
        reference_proc.wait(timeout=max(10, a.steps * (a.sleep + 0.05)))
        self.same_as_reference("D", self.result("ref"))
        self.steps_continuous("D")
        r.note("observations", "D_out_tail", self.tail("D", 15))
        # The restored run (its script a handed-over copy, in its own mount namespace) is
        # imaged again: docs/gpu-validation.md runs 22-24 found it was not.
        after = {"images": [f["image"] for f in self.known.get(job_d, {}).values() if f["epoch"] >= 1],
                 "failed": [e[1][-220:] for e in agent_events(c, f"job {job_d}: periodic checkpoint failed")][:3]}
        r.check("D_restored_run_imaged_again", bool(after["images"]), after)

    def phase_suspend(self, reference_proc: subprocess.Popen) -> None:
        c, r, a = self.c, self.report, self.args
        gc.stop(c)
        gc.start(c, "suspend", grace=a.grace, cpus=a.cpus)
        job_b = self.submit("B", a.ballast_b, "10m")
        node_b = tc.wait_job(c, job_b, {"RUNNING"}, 60)["BatchHost"]
        self.wait_progress_after("B", 0, 120)
        tc.wait_for(lambda: len(progress(self.out("B"))) >= 3, 60, "B's progress")
        pids = job_pids(f"{self.dir}/B.json")
        running = gpu_snapshot()
        r.note("observations", "gpu_B_running", running)
        t_urgent = time.time()
        urgent = self.urgent(node_b, a.urgent_seconds, gres=False)
        tc.wait_job(c, job_b, {"SUSPENDED"}, 60)
        t_susp = time.time()
        r.note("timings", "B_urgent_submitted_to_suspended_s", round(t_susp - t_urgent, 2))
        samples = []
        while time.time() - t_susp < min(a.urgent_seconds - 5, 25):
            snap = gpu_snapshot() or {}
            samples.append({"t_after_suspend": round(time.time() - t_susp, 1), "used_mib": snap.get("used_mib"),
                            "job_apps": {p: m for p, m in snap.get("apps", {}).items() if p in pids},
                            "steps": len(progress(self.out("B"))), "frozen": self.frozen(pids)})
            time.sleep(2)
        r.note("observations", "B_while_suspended", samples)
        late = samples[len(samples) // 2:]
        r.check("B_no_progress_while_suspended", len({s["steps"] for s in late}) == 1 and bool(late),
                [s["steps"] for s in samples])
        r.check("B_frozen_while_suspended", bool(late) and all(s["frozen"] for s in late),
                [s["frozen"] for s in samples])
        if self.gpu:
            held = {p: m for p, m in running["apps"].items() if p in pids}
            drop = (running["used_mib"] or 0) - max((s["used_mib"] or 0) for s in late) if late else 0
            # nvidia-smi must have listed the job's processes while it ran (so its PIDs are
            # comparable), list none of them while suspended, and the memory must have gone.
            freed = bool(held) and all(not s["job_apps"] for s in late) and drop >= 0.8 * a.ballast_b * 1024
            r.check("B_gpu_memory_released_while_suspended", freed,
                    f"job GPU apps running {held}, dropped {drop} MiB, "
                    f"used {running['used_mib']} MiB -> {[s['used_mib'] for s in samples]}")
        else:
            r.check("B_gpu_memory_released_while_suspended", None, "no GPU here")
        r.note("observations", "B_agent_events", [e[1] for e in agent_events(
            c, "holding off|checkpointed \\(lock|GPU state|resume|freeze")][-12:])
        tc.wait_job(c, urgent, {"COMPLETED", "CANCELLED", "FAILED"}, a.urgent_seconds + 60)
        tc.wait_job(c, job_b, {"RUNNING"}, 60)
        t_resumed = time.time()
        first = self.wait_progress_after("B", t_resumed, 120)
        r.note("timings", "B_resumed_to_first_progress_s", round(first[0] - t_resumed, 2))
        r.note("observations", "gpu_B_resumed", gpu_snapshot())
        end_b = tc.wait_job(c, job_b, {"COMPLETED", "FAILED", "CANCELLED"}, a.steps * (a.sleep + 0.05) + 300)
        r.check("B_completed", end_b["JobState"] == "COMPLETED",
                f"{end_b['JobState']} exit {end_b.get('ExitCode')} restarts {end_b.get('Restarts')}")
        reference_proc.wait(timeout=60)
        self.same_as_reference("B", self.result("ref"))
        self.steps_continuous("B")
        r.note("observations", "B_out_tail", self.tail("B", 15))

    @staticmethod
    def frozen(pids: list[int]) -> bool | None:
        """Whether the cgroup of the job's first process reports itself frozen."""
        for pid in pids:
            try:
                line = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
            except OSError:
                continue
            for entry in line:
                _, controllers, path = entry.split(":", 2)
                if controllers == "":
                    events = gc.CGROUP / path.lstrip("/") / "cgroup.events"
                    if events.exists():
                        return "frozen 1" in events.read_text()
                if "freezer" in controllers:
                    state = gc.CGROUP / "freezer" / path.lstrip("/") / "freezer.state"
                    if state.exists():
                        return state.read_text().strip() == "FROZEN"
        return None

    def tail(self, name: str, lines: int = 8) -> list[str]:
        path = self.out(name)
        return path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--state-dir", type=Path, default=Path("/tmp/slurm_mm-gpu-cluster"))
    p.add_argument("--python", default="/usr/bin/python3", help="interpreter of the job (with torch on GPUs)")
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--sleep", type=float, default=0.03)
    p.add_argument("--report", type=int, default=50)
    p.add_argument("--interval", default="20s")
    p.add_argument("--grace", type=int, default=90)
    p.add_argument("--urgent-seconds", type=int, default=35)
    p.add_argument("--ballast-a", type=float, default=1.0)
    p.add_argument("--ballast-b", type=float, default=6.0)
    p.add_argument("--ballast-c", type=float, default=0.25)
    p.add_argument("--phases", default="requeue,steps,suspend")
    p.add_argument("--cpus", type=int, default=4, help="CPUs of each node")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    s = Scenario(args)
    s.report.note("observations", "machine", {
        "gpu": gc.has_gpu(), "cgroup": gc.cgroup_mode(), "kernel": os.uname().release,
        "slurm": subprocess.run(["slurmd", "-V"], capture_output=True, text=True).stdout.strip(),
        "nvidia_smi": subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                      "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
        if shutil.which("nvidia-smi") else None,
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
    gc.stop(s.c)
    s.prepare()
    phases = args.phases.split(",")
    try:
        reference = s.start_reference()
        if "requeue" in phases:
            s.phase_requeue(reference)
        if "steps" in phases:
            s.phase_steps(reference)
        if "suspend" in phases:
            s.phase_suspend(reference)
    except (TimeoutError, RuntimeError, subprocess.CalledProcessError, OSError) as exc:
        s.report.check("scenario_ran_to_the_end", False, f"{type(exc).__name__}: {exc}")
    finally:
        if s.watch:
            s.watch.done.set()
        for name in ("A", "B", "C", "D", "ref"):
            if s.out(name).exists():
                shutil.copy(s.out(name), args.out / f"{name}.out")
        gc.stop(s.c)
    failures = s.report.failures()
    log(f"failures: {', '.join(failures) if failures else 'none'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
