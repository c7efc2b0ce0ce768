#!/opt/slurm_mm/venv/bin/python
"""The slurm_mm story on a local 3-node Slurm cluster, for a newcomer to watch.

A job enrolled with --checkpoint-interval is checkpointed while it runs, preempted by a
high-priority job, resumed on another node from its image, and finishes with the same
result as an uninterrupted run.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
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
                              capture_output=True, text=True, check=True).stdout.splitlines()[-1]
    say(f"an uninterrupted run of the workload ends with: {expected}")

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
    say(f"job {job} was checkpointed in its grace time and requeued")
    show(["slurm-mm", "images", job], c)
    info = tc.wait_job(c, job, {"RUNNING"}, timeout=120, node_not=first_node)
    say(f"job {job} resumed on {info['BatchHost']} (restart {info['Restarts']}) from its image")
    show(["slurm-mm", "status"], c)
    info = tc.wait_job(c, job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=180)
    output = (work / "demo.out").read_text()
    print(output, end="")
    result = output.strip().splitlines()[-1]
    if info["JobState"] == "COMPLETED" and result == expected:
        say(f"job {job} COMPLETED with the same result as an uninterrupted run: no work was lost")
        return 0
    say(f"MISMATCH: job ended {info['JobState']} with '{result}', expected '{expected}'")
    return 1


def _images(c, job: str) -> int:
    out = subprocess.run(["slurm-mm", "images", job, "--json"], env=c.env(), capture_output=True, text=True)
    return out.stdout.count('"image"') if out.returncode == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
