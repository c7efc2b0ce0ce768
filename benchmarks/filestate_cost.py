#!/opt/slurm_mm/venv/bin/python
"""What recording a job's file state adds to the freeze of a periodic checkpoint.

    sudo /opt/slurm_mm/venv/bin/python benchmarks/filestate_cost.py [--repeat 5] [--local-mib 64]

A job (run as an unprivileged user under mm-init) holds 20 shared input files open
read-only (1 MiB each), 5 logs open for writing, and node-local scratch files in its own
$TMPDIR stand-in (--local-mib in all). It is checkpointed with --leave-running, as a
periodic checkpoint is, with and without the file-state capture, in the same run; the
figure is CRIU's dump wall time (the tree is frozen for it, and the capture runs inside
it, at CRIU's post-dump). Prints one line per figure.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from slurm_mm.engine import Criu, checkpoint_tree, filestate, launch  # noqa: E402

USER = "mmtest"
JOB = """
import os, sys, time
base, local = sys.argv[1], sys.argv[2]
held = [open(os.path.join(base, f"in{i}.dat"), "rb") for i in range(20)]
logs = [open(os.path.join(base, f"log{i}.txt"), "w") for i in range(5)]
scratch = [open(os.path.join(local, f"s{i}.bin"), "r+b") for i in range(4)]
print("READY", flush=True)
while True:
    for f in logs:
        f.write("x" * 100 + "\\n"); f.flush()
    time.sleep(0.05)
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--local-mib", type=int, default=64)
    args = ap.parse_args()
    subprocess.run(["make", "-s", "-C", str(REPO / "slurm_mm" / "native")], check=True)
    subprocess.run(["useradd", "-m", USER], capture_output=True)
    user = pwd.getpwnam(USER)
    work = Path(tempfile.mkdtemp(prefix="slurm_mm-fsbench-"))
    work.chmod(0o755)
    shared, local = work / "shared", work / "local"
    for d in (shared, local):
        d.mkdir()
        os.chown(d, user.pw_uid, user.pw_gid)
    for i in range(20):
        (shared / f"in{i}.dat").write_bytes(os.urandom(1 << 20))
    per = (args.local_mib << 20) // 4
    for i in range(4):
        (local / f"s{i}.bin").write_bytes(os.urandom(per))
    for p in [*shared.iterdir(), *local.iterdir()]:
        os.chown(p, user.pw_uid, user.pw_gid)
    (work / "job.py").write_text(JOB)
    out = os.open(work / "out.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    criu = Criu(libexec=REPO / "slurm_mm" / "native")
    tree = launch(["/usr/bin/python3", str(work / "job.py"), str(shared), str(local)], uid=user.pw_uid,
                  gid=user.pw_gid, cwd=work, stdout=out, stderr=out, libexec=REPO / "slurm_mm" / "native")
    try:
        deadline = time.monotonic() + 30
        while b"READY" not in (work / "out.log").read_bytes():
            if time.monotonic() > deadline:
                raise SystemExit("job did not start: " + (work / "out.log").read_text())
            time.sleep(0.05)
        spec = filestate.CaptureSpec(init_pid=0, images_dir="", node="bench", owner_uid=user.pw_uid,
                                     owner_gids=[user.pw_gid], node_local=[str(local)], budget=1 << 30,
                                     pin_root=str(work / "pins"), pin_name="")
        times: dict[str, list[float]] = {"without": [], "with": []}
        for n in range(args.repeat):
            for mode in ("without", "with"):
                images = work / f"img-{mode}-{n}"
                files = None if mode == "without" else filestate.CaptureSpec(**{**vars(spec), "pin_name": f"p{n}"})
                r = checkpoint_tree(tree.init_pid, images, leave_running=True, criu=criu, files=files)
                times[mode].append(r.timings["dump"])
                shutil.rmtree(images)
        base, extra = statistics.median(times["without"]), statistics.median(times["with"])
        print(f"freeze (criu dump, leave-running), without file state: {base:.3f} s (median of {args.repeat})")
        print(f"freeze with file state (25 shared files pinned, {args.local_mib} MiB node-local copied): "
              f"{extra:.3f} s; added {extra - base:+.3f} s")
    finally:
        tree.kill()
        tree.wait(10)
        os.close(out)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
