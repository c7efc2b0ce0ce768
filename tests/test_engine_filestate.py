"""A job's files travel with its image (real CRIU, real processes, the owner unprivileged).

Each workload (tests/workloads/file_state.py) checks its own files after the restore and
says PASS or FAIL. The harness plays the world: it lets the job move on after an image
(as after a node failure, restore from a periodic image), deletes node-local files (as
on another node), or changes a file behind the job's back.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from engine_fixtures import both_layouts, engine_env, needs_root, workload  # noqa: F401
from slurm_mm.engine import checkpoint_tree, filestate, wait_gone
from slurm_mm.errors import FileStateRefused

pytestmark = needs_root


def spec(w, node_local=(), budget=64 << 20, pin_root: Path | None = None) -> filestate.CaptureSpec:
    u = w.env.user
    return filestate.CaptureSpec(init_pid=0, images_dir="", node="n1", owner_uid=u.pw_uid,
                                 owner_gids=[u.pw_gid], node_local=[str(p) for p in node_local],
                                 budget=budget, pin_root=str(pin_root) if pin_root else None,
                                 pin_name="p1" if pin_root else None)


def image_then_move_on(w, images: Path, files: filestate.CaptureSpec):
    """A periodic image, then the job makes progress, then its node dies (SIGKILL)."""
    result = w.checkpoint(images, leave_running=True, files=files)
    (w.dir / "STEP1").touch()
    w.wait_for("MOVED", "out.log", 30)
    os.kill(w.tree.init_pid, signal.SIGKILL)
    w.tree.wait(10)
    assert wait_gone(result.pids, 5, zombies_count=False) == []
    return result


def restore_with_files(w, images: Path, tmp_path: Path, pin_root: Path | None = None, node: str = "n1"):
    u = w.env.user
    prepared = filestate.prepare(images, node=node, uid=u.pw_uid, gids=[u.pw_gid], pin_root=pin_root,
                                 work=tmp_path / "handed")
    try:
        restored = w.restore(images, extra_inherit=prepared.inherit)
    finally:
        prepared.close()
    w.go()
    code = restored.wait(60)
    return code, w.text("restored.log"), prepared.report


def test_truncating_writer_is_rolled_back_to_its_image(workload, tmp_path):
    w = workload("file_state.py", "writer")
    w.start()
    result = image_then_move_on(w, tmp_path / "img", spec(w))
    assert result.files["count"] >= 1
    assert (w.dir / "log.txt").stat().st_size > 0
    code, out, report = restore_with_files(w, tmp_path / "img", tmp_path)
    assert code == 0 and "PASS" in out, out
    assert any("log.txt: cut back" in line for line in report), report


@both_layouts
def test_deleted_intermediate_is_brought_back_from_its_pin(workload, tmp_path, private_proc):
    pins = tmp_path / "pins"
    w = workload("file_state.py", "intermediate")
    w.start(private_proc=private_proc)
    image_then_move_on(w, tmp_path / "img", spec(w, pin_root=pins))
    assert not (w.dir / "inter.dat").exists()
    code, out, report = restore_with_files(w, tmp_path / "img", tmp_path, pin_root=pins)
    assert code == 0 and "PASS" in out, out
    assert any("inter.dat: deleted since the image: brought back" in line for line in report), report
    assert not (w.dir / "inter.dat").exists(), "the restored job deleted it again, as it did the first time"


def test_deleted_intermediate_on_another_filesystem_than_the_pins_comes_back_from_its_copy(workload, tmp_path):
    """A store whose pins cannot hard-link the job's files (a home on NFS, the store on
    Lustre): the owner's file is copied into the image instead. Before, the restore was
    refused ("deleted since the image, and the image holds no copy of it")."""
    w = workload("file_state.py", "intermediate")
    other = next(d for d in ("/dev/shm", "/var/tmp", "/run") if os.stat(d).st_dev != os.stat(w.dir).st_dev)
    pins = Path(tempfile.mkdtemp(prefix="slurm_mm-pins-", dir=other))
    try:
        w.start()
        image_then_move_on(w, tmp_path / "img", spec(w, pin_root=pins))
        assert not (w.dir / "inter.dat").exists()
        code, out, report = restore_with_files(w, tmp_path / "img", tmp_path, pin_root=pins)
        assert code == 0 and "PASS" in out, out
        assert any("inter.dat: deleted since the image: its saved content put back" in line for line in report), report
    finally:
        shutil.rmtree(pins, ignore_errors=True)


def started_with_scratch(workload, mode: str = "local"):
    """A workload with its node-local scratch directory (owned by the user)."""
    w = workload("file_state.py", mode)
    scratch = w.dir / "scratch"
    scratch.mkdir()
    os.chown(scratch, w.env.user.pw_uid, w.env.user.pw_gid)
    w.args.append(str(scratch))
    w.start()
    return w, scratch


def moved_to_a_node_without_scratch(workload, tmp_path, mode: str):
    """Stopping image of a workload with node-local scratch, restored where the scratch is gone."""
    w, scratch = started_with_scratch(workload, mode)
    result = w.checkpoint(tmp_path / "img", leave_running=False, files=spec(w, node_local=[scratch]))
    w.tree.wait(10)
    assert result.files["saved_bytes"] >= 1 << 20
    shutil.rmtree(scratch)  # the next node never had it
    code, out, report = restore_with_files(w, tmp_path / "img", tmp_path, node="n2")
    assert code == 0 and "PASS" in out, out
    return w, scratch, report


def test_node_local_file_is_recreated_on_a_node_without_it(workload, tmp_path):
    w, scratch, _ = moved_to_a_node_without_scratch(workload, tmp_path, "local")
    assert (scratch / "work.dat").stat().st_uid == w.env.user.pw_uid


def test_closed_scratch_files_come_back_on_a_node_without_them(workload, tmp_path):
    # A script's `app1 > stage/a.out; app2 stage/a.out` in its node-local working directory:
    # nothing holds a.out at the image, yet the next step needs it on the new node.
    w, scratch, report = moved_to_a_node_without_scratch(workload, tmp_path, "scratch")
    assert any("stage/a.out: node-local file recreated" in line for line in report), report
    assert (scratch / "stage" / "a.out").stat().st_uid == w.env.user.pw_uid


def spool_job_dir(engine_env):
    """Like the batch script in slurmd's spool dir of another node: a root-owned directory
    (its job directory writable only while the job sets its file up)."""
    spool = engine_env.base / f"spool-{os.getpid()}-{time.monotonic_ns()}"
    spool.mkdir(mode=0o755)
    os.chown(spool, 0, 0)
    scratch = spool / "job1"
    scratch.mkdir()
    scratch.chmod(0o777)
    return spool, scratch


def gone_but_not_creatable(scratch: Path) -> None:
    shutil.rmtree(scratch)
    scratch.mkdir(mode=0o755)  # it exists again, but the owner cannot create the file in it


def test_file_the_owner_cannot_create_is_handed_over_at_its_offset(workload, tmp_path, engine_env):
    spool, scratch = spool_job_dir(engine_env)
    w = workload("file_state.py", "local", str(scratch), "fd-only")
    w.start()
    w.checkpoint(tmp_path / "img", leave_running=False, files=spec(w, node_local=[spool]))
    w.tree.wait(10)
    gone_but_not_creatable(scratch)
    code, out, report = restore_with_files(w, tmp_path / "img", tmp_path, node="n2")
    assert "handed over from the image" in " ".join(report), report
    assert code == 0 and "PASS" in out, out


@both_layouts
def test_a_handed_over_file_is_handed_over_again_at_the_next_image(workload, tmp_path, engine_env, private_proc):
    # A job restored on a node with another spool directory holds its script through the
    # handed-over copy: in its own mount namespace that copy is on a mount CRIU cannot
    # find, so it is dumped as external and handed in again from the image's copy.
    spool, scratch = spool_job_dir(engine_env)
    w = workload("file_state.py", "local", str(scratch), "fd-only")
    w.start(private_proc=private_proc)
    w.checkpoint(tmp_path / "img1", leave_running=False, files=spec(w, node_local=[spool]))
    w.tree.wait(10)
    gone_but_not_creatable(scratch)
    u = w.env.user
    prepared = filestate.prepare(tmp_path / "img1", node="n2", uid=u.pw_uid, gids=[u.pw_gid], pin_root=None,
                                 work=tmp_path / "handed1")
    try:
        restored = w.restore(tmp_path / "img1", extra_inherit=prepared.inherit)
    finally:
        prepared.close()
    result = checkpoint_tree(restored.init_pid, tmp_path / "img2", criu=w.env.criu, leave_running=False,
                             files=spec(w, node_local=[spool]))
    restored.wait(10)
    assert wait_gone(result.pids, 5, zombies_count=False) == []
    code, out, report = restore_with_files(w, tmp_path / "img2", tmp_path, node="n3")
    if private_proc:
        assert "handed over again from the image" in " ".join(report), report
    assert code == 0 and "PASS" in out, out


def test_image_is_refused_when_another_party_changed_a_file_the_job_reads(workload, tmp_path):
    w = workload("file_state.py", "reader")
    w.start()
    w.checkpoint(tmp_path / "img", leave_running=False, files=spec(w))
    w.tree.wait(10)
    with open(w.dir / "input.dat", "ab") as f:
        f.write(b"someone else's bytes")
    u = w.env.user
    with pytest.raises(FileStateRefused, match=r"input.dat: size 1048576 -> 1048596"):
        filestate.prepare(tmp_path / "img", node="n1", uid=u.pw_uid, gids=[u.pw_gid], pin_root=None,
                          work=tmp_path / "handed")


def test_node_local_files_past_the_budget_make_a_same_node_only_image(workload, tmp_path):
    w, scratch = started_with_scratch(workload)
    result = w.checkpoint(tmp_path / "img", leave_running=False,
                          files=spec(w, node_local=[scratch], budget=1000))
    w.tree.wait(10)
    assert result.files["same_node_only"] and "past the image's file budget" in result.files["notes"][0]
    u = w.env.user
    with pytest.raises(FileStateRefused, match="on n1 only"):
        filestate.prepare(tmp_path / "img", node="n2", uid=u.pw_uid, gids=[u.pw_gid], pin_root=None,
                          work=tmp_path / "handed")
    code, out, _ = restore_with_files(w, tmp_path / "img", tmp_path, node="n1")
    assert code == 0 and "PASS" in out, out


@pytest.mark.parametrize("how", ["fd", "mmap"])
def test_file_rewritten_in_place_gets_its_saved_content_back(workload, tmp_path, how):
    w = workload("file_state.py", "rewriter", *(["mmap"] if how == "mmap" else []))
    w.start()
    result = image_then_move_on(w, tmp_path / "img", spec(w))
    assert result.files["saved_bytes"] >= 4096
    code, out, report = restore_with_files(w, tmp_path / "img", tmp_path)
    assert code == 0 and "PASS" in out, out
    assert any("data.bin: rewritten since the image" in line for line in report), report
