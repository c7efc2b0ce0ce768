"""`slurm-mm status`'s "in progress" column: live restore progress, and nothing once done."""

from __future__ import annotations

import socket
import time

from agent_fakes import GID, UID, FakeCheckpointer, FakeSlurm, fake_image, make_job

from slurm_mm import config
from slurm_mm.agent.job_record import LaunchRequest
from slurm_mm.agent.preemption import Preemption
from slurm_mm.agent.services import JobRegistry, NodeServices
from slurm_mm.agent.supervisor import JobSupervisor
from slurm_mm.cli.job_cmds import _progress_text

MIB = 1 << 20


def test_progress_shows_bytes_and_no_rate_before_the_first_byte():
    started = time.time() - 1.0
    text = _progress_text({"trigger": "restore", "phase": "extracting", "bytes_done": 0,
                           "bytes_total": int(3.6 * MIB), "started": started})
    assert text.startswith("restore extracting 0 B/3.6 MiB (") and "B/s" not in text
    text = _progress_text({"trigger": "restore", "phase": "extracting", "bytes_done": int(1.2 * MIB),
                           "bytes_total": int(3.6 * MIB), "started": time.time() - 1.5})
    assert text.startswith("restore extracting 1.2 MiB/3.6 MiB (819.2 KiB/s, 1.5 s")


def test_a_finished_restore_leaves_no_progress_behind(tmp_path):
    cfg = config.from_mapping({"run_dir": str(tmp_path / "run"), "staging_dir": str(tmp_path / "staging")})
    checkpointer = FakeCheckpointer(tmp_path, [fake_image(1)])
    seen = []
    real = checkpointer.restore_image

    def restore_image(job_id, image, target, *, progress=None, on_phase=None, after=None, files=True):
        on_phase("extracting")
        progress(MIB, 2 * MIB)
        seen.append(sup.record.progress.phase)  # live while it runs
        return real(job_id, image, target, progress=progress, on_phase=on_phase, after=after, files=files)

    checkpointer.restore_image = restore_image
    slurm = FakeSlurm(make_job(1))
    services = NodeServices("n1", cfg, slurm, checkpointer, Preemption(slurm), JobRegistry())
    conn, peer = socket.socketpair()
    req = LaunchRequest(job=slurm.current, uid=UID, gid=GID, groups=[GID], argv=["/bin/true"], env={},
                        cwd="/tmp", stdio=[peer.fileno()] * 3, cgroup_procs=[], interval=0)
    sup = JobSupervisor(services, req, conn)
    try:
        assert sup.start() == "restored"
        assert seen == ["extracting"]
        assert sup.record.progress.phase == "idle" and sup.record.progress.bytes_total == 0
    finally:
        for tree in checkpointer.trees:
            tree.end(0)
        conn.close()
        peer.close()
