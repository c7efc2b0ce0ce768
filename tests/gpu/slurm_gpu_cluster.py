#!/usr/bin/env python3
"""slurm_mm's test cluster with GPUs: contrib/testcluster/testcluster.py plus GRES and cgroup v2.

The same three slurmd (n1..n3, one machine), munged, slurmctld, SPANK plugin, prolog/
epilog and node agents as the CPU test cluster, with what a GPU node adds:
- `GresTypes=gpu`, `Gres=gpu:1` on every node and a gres.conf naming /dev/nvidia0
  (the three nodes share the one GPU: a requeued job can run on "another node");
- cgroup v2 without systemd (`IgnoreSystemd=yes`: Slurm makes its own
  system.slice/<node>_slurmstepd.scope), which `stop` also cleans up;
- a longer GraceTime (GPU images take longer to commit) and more CPUs per node;
- the agents' `job_mount_namespace: auto` (GPU nodes get the private /proc CUDA needs).
Without /dev/nvidia0 it is the CPU cluster with those settings (the dry run here).

    slurm_gpu_cluster.py [--state-dir DIR] start [--preempt-mode requeue|suspend] | stop | status
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GPU_DEVICE = Path("/dev/nvidia0")
CGROUP = Path("/sys/fs/cgroup")


def load_testcluster():
    spec = importlib.util.spec_from_file_location(
        "testcluster", REPO / "contrib" / "testcluster" / "testcluster.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("testcluster", module)
    spec.loader.exec_module(module)
    return module


tc = load_testcluster()


def has_gpu() -> bool:
    return GPU_DEVICE.exists()


def write_configs(c, preempt_mode: str, *, gpu: bool, grace: int, cpus: int) -> None:
    """testcluster's configuration, then the GPU node's differences written over it."""
    tc.write_configs(c, preempt_mode)
    if "SLURM_MM_TEST_MOUNT_NS" not in os.environ:  # testcluster's default is never
        mm = c.mm_config.read_text().replace("job_mount_namespace: never", "job_mount_namespace: auto")
        c.mm_config.write_text(mm)
    text = c.slurm_conf.read_text()
    gres = " Gres=gpu:1" if gpu else ""
    text = re.sub(r"CPUs=2 RealMemory=2000", f"CPUs={cpus} RealMemory=8000{gres}", text)
    text = re.sub(r"GraceTime=\d+", f"GraceTime={grace}", text)
    if gpu:
        text = text.replace("ProctrackType=", "GresTypes=gpu\nProctrackType=", 1)
        (c.etc / "gres.conf").write_text(
            f"NodeName={','.join(tc.NODES)} Name=gpu File={GPU_DEVICE}\n")
    c.slurm_conf.write_text(text)
    # cgroup/v2 with no systemd to delegate to: Slurm makes the hierarchy itself. Ignored
    # where autodetect picks cgroup/v1 (the Debian VM's hybrid mounts).
    with open(c.etc / "cgroup.conf", "a") as conf:
        conf.write("CgroupAutomount=yes\nIgnoreSystemd=yes\n")


def cgroup_mode() -> str:
    return "v2" if (CGROUP / "cgroup.controllers").exists() else "v1"


def start(c, preempt_mode: str = "requeue", *, grace: int = 90, cpus: int = 4) -> None:
    if tc.read_pid(c.pid_file("slurmctld")):
        raise RuntimeError(f"a test cluster is already running in {c.state}; stop it first")
    tc.ensure_user()
    tc.check_installed()  # the cluster runs the installed plugin (run_under_slurm.sh, install-deps.sh)
    tc.clean_run_dir(c)
    write_configs(c, preempt_mode, gpu=has_gpu(), grace=grace, cpus=cpus)
    if cgroup_mode() == "v2":
        # Where systemd would put Slurm's scopes; without systemd nobody else makes it.
        (CGROUP / "system.slice").mkdir(exist_ok=True)
    tc.start_munge(c)
    tc.start_ctld(c)
    for node in tc.NODES:
        tc.start_node(c, node)
    tc.wait_for(lambda: len(tc.node_states(c)) == len(tc.NODES)
                and all(s == "idle" for s in tc.node_states(c).values()), 60, "idle nodes")


def v2_scopes() -> list[Path]:
    return [CGROUP / "system.slice" / f"{node}_slurmstepd.scope" for node in tc.NODES]


def remove_v2_cgroups() -> None:
    """Thaw, kill and remove what Slurm's cgroup/v2 made (testcluster knows only v1)."""
    for scope in v2_scopes():
        if not scope.is_dir():
            continue
        dirs = sorted((p for p in scope.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for d in [scope, *dirs]:
            try:
                (d / "cgroup.freeze").write_text("0")
            except OSError:
                pass
        for d in dirs:
            try:
                tc.kill_all(int(p) for p in (d / "cgroup.procs").read_text().split())
            except OSError:
                continue
        tc.rmdir_all(dirs + [scope], tries=30)


def stop(c) -> None:
    tc.stop(c)
    if cgroup_mode() == "v2":
        remove_v2_cgroups()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, default=Path("/tmp/slurm_mm-gpu-cluster"))
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start")
    p_start.add_argument("--preempt-mode", choices=("requeue", "suspend"), default="requeue")
    p_start.add_argument("--grace", type=int, default=90)
    sub.add_parser("stop")
    sub.add_parser("status")
    args = parser.parse_args(argv)
    c = tc.Cluster(args.state_dir)
    try:
        if args.command == "start":
            start(c, args.preempt_mode, grace=args.grace)
            print(f"GPU test cluster up in {c.state} (gpu={has_gpu()}, cgroup {cgroup_mode()})")
        elif args.command == "stop":
            stop(c)
            print(f"GPU test cluster in {c.state} stopped")
        else:
            print(json.dumps(tc.status(c), indent=2))
    except (subprocess.CalledProcessError, TimeoutError, RuntimeError, OSError) as exc:
        print(f"slurm_gpu_cluster: error: {exc} (logs: {c.log})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
