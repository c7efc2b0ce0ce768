#!/opt/slurm_mm/venv/bin/python
"""The slurm_mm story on a local 3-node Slurm cluster, for a newcomer to watch.

A job enrolled with --checkpoint-interval is checkpointed while it runs, preempted by a
high-priority job, resumed on another node from its image, and finishes with the same
result as an uninterrupted run. Each claim is checked, not only printed: an image with
trigger `preempt` exists after the requeue, the workload started fresh exactly once,
and its whole output (not only the last line) equals an uninterrupted run's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("testcluster", HERE.parent / "testcluster" / "testcluster.py")
tc = importlib.util.module_from_spec(spec)
sys.modules["testcluster"] = tc
spec.loader.exec_module(tc)

STEPS = 500  # 0.1 s each: a 50 s job
NOT_WORKLOAD = re.compile(r"^(slurm_mm|slurmstepd(-[^:\s]+)?): ")


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def show(cmd: list[str], c) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, env=c.env())


def main() -> int:
    c = tc.Cluster(Path(os.environ.get("SLURM_MM_DEMO_DIR", "/tmp/slurm_mm-demo")))
    tc.stop(c)
    if c.state.exists():
        shutil.rmtree(c.state)
    say("starting a local Slurm cluster: munge, slurmctld, slurmd n1 n2 n3, a slurm_mm agent per node")
    tc.start(c)
    try:
        return story(c)
    finally:
        say("stopping the cluster")
        tc.stop(c)


def story(c) -> int:
    show(["sinfo"], c)
    user = pwd.getpwnam(tc.USER)
    work = Path(user.pw_dir) / "demo"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    shutil.copy(HERE / "workload.py", work / "workload.py")
    os.chown(work, user.pw_uid, user.pw_gid)
    expected = subprocess.run([sys.executable, str(HERE / "workload.py"), str(STEPS), "--fast"],
                              capture_output=True, text=True, check=True).stdout.splitlines()
    say(f"an uninterrupted run of the workload prints {len(expected)} lines, ending with: {expected[-1]}")

    script = f"#!/bin/sh\nexec python3 {work}/workload.py {STEPS}\n"
    say(f"user {tc.USER} submits: sbatch --checkpoint-interval=10s -p low job.sh")
    job = tc.job_id(tc.sbatch(c, script, "--checkpoint-interval=10s", "-p", "low", "-J", "demo",
                              "-o", str(work / "demo.out"), cwd=work))
    info = tc.wait_job(c, job, {"RUNNING"}, timeout=60)
    first_node = info["BatchHost"]
    say(f"job {job} runs on {first_node}; waiting for its first periodic checkpoint")
    tc.wait_for(lambda: _images(c, job) >= 1, 60, "a periodic image")
    show(["slurm-mm", "images", job], c)

    say(f"a high-priority job needs {first_node}: sbatch -p high -w {first_node} --exclusive (preempts job {job})")
    tc.sbatch(c, "#!/bin/sh\nsleep 15\n", "-p", "high", "-w", first_node, "--exclusive", "-J", "urgent", "-o", "/dev/null", cwd=work)
    tc.wait_for(lambda: tc.job_info(c, job).get("Restarts", "0") != "0", 90, "the requeue")
    triggers = [image["trigger"] for image in _image_list(c, job)]
    show(["slurm-mm", "images", job], c)
    if "preempt" not in triggers:
        say(f"FAILED: job {job} was requeued without a preempt image (images: {triggers})")
        return 1
    say(f"job {job} was checkpointed in its grace time (trigger preempt) and requeued")
    info = tc.wait_job(c, job, {"RUNNING"}, timeout=120, node_not=first_node)
    say(f"job {job} runs again on {info['BatchHost']} (restart {info['Restarts']}); slurm_mm restores it from its image")
    show(["slurm-mm", "status"], c)
    tc.wait_for(lambda: "slurm_mm: restored from" in (work / "demo.out").read_text(), 120, "the restore")
    say(f"job {job} resumed from its image (the job's output says so; admins see the image in AdminComment):")
    print([l for l in (work / "demo.out").read_text().splitlines() if "restored from" in l][-1])
    comment = tc.admin_comment(c, job)
    print(f"AdminComment={comment}")
    info = tc.wait_job(c, job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=180)
    time.sleep(5)  # a job wrongly requeued after it completed shows up here (Restarts=2)
    info = tc.job_info(c, job)
    output = (work / "demo.out").read_text()
    print(output, end="")
    code = verdict(job, info, output, expected)
    return code or scrape_metrics(c)


def scrape_metrics(c) -> int:
    """What Prometheus' node_exporter would collect from the agents' textfiles."""
    say(f"the node agents' metrics ({c.metrics}/slurm_mm_<node>.prom), as a scrape would see them:")
    totals: dict[str, float] = {}
    for path in sorted(c.metrics.glob("slurm_mm_*.prom")):
        for line in path.read_text().splitlines():
            if line.startswith("#"):
                continue
            name_labels, value = line.rsplit(" ", 1)
            if name_labels.startswith(("slurm_mm_checkpoints_total", "slurm_mm_restores_total",
                                       "slurm_mm_checkpoint_duration_seconds", "slurm_mm_restore_duration_seconds",
                                       "slurm_mm_checkpoint_freeze_seconds", "slurm_mm_jobs_started_total")):
                print(line)
            name = name_labels.split("{")[0]
            if 'outcome="failure"' not in name_labels:
                totals[name] = totals.get(name, 0.0) + float(value)
    wanted = ("slurm_mm_checkpoints_total", "slurm_mm_restores_total",
              "slurm_mm_checkpoint_duration_seconds_sum", "slurm_mm_restore_duration_seconds_sum")
    missing = [name for name in wanted if totals.get(name, 0.0) <= 0]
    if missing:
        say(f"FAILED: metrics without successful events: {', '.join(missing)}")
        return 1
    return 0


def verdict(job: str, info: dict[str, str], output: str, expected: list[str]) -> int:
    """Compare the job's own output with the uninterrupted run's, line by line.

    Lines from slurm_mm's wrapper (`slurm_mm: ...`) and Slurm (`slurmstepd: ...`, or
    `slurmstepd-<node>: ...` with several slurmd per host) are not the workload's; everything else must match exactly: one fresh start, no step
    lost or repeated, the same result.
    """
    lines = [l for l in output.splitlines() if not NOT_WORKLOAD.match(l)]
    problems = []
    if info["JobState"] != "COMPLETED" or info.get("Restarts") != "1":
        problems.append(f"job ended {info['JobState']} after {info.get('Restarts')} restarts (expected COMPLETED after 1)")
    starts = lines.count("fresh start")
    if starts != 1:
        problems.append(f"the workload started fresh {starts} times (expected once: the rest were restores)")
    if lines != expected:
        diff = next((i for i, (a, b) in enumerate(zip(lines, expected)) if a != b), min(len(lines), len(expected)))
        got = lines[diff] if diff < len(lines) else "<end of output>"
        want = expected[diff] if diff < len(expected) else "<end of output>"
        problems.append(f"output differs from an uninterrupted run at line {diff + 1}: '{got}', expected '{want}'")
    if problems:
        for problem in problems:
            say(f"FAILED: {problem}")
        return 1
    say(f"job {job} COMPLETED after one preemption: started fresh once, and all {len(expected)} lines of "
        "its output equal an uninterrupted run's: no work was lost or repeated")
    return 0


def _image_list(c, job: str) -> list[dict]:
    out = subprocess.run(["slurm-mm", "images", job, "--json"], env=c.env(), capture_output=True, text=True)
    if out.returncode != 0:
        return []
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        return []


def _images(c, job: str) -> int:
    return len(_image_list(c, job))


if __name__ == "__main__":
    sys.exit(main())
