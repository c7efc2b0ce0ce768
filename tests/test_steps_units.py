"""What slurm_mm refuses to checkpoint: node counts of Slurm hostlists, and `srun`
clients in a process tree found by their executable (not their argv[0])."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from slurm_mm.agent.step_launch import JobSteps
from slurm_mm.checkpointer import image_pins
from slurm_mm.engine import filestate
from slurm_mm.engine.owner import Owner
from slurm_mm.errors import FileStateRefused
from store_fixtures import ensure_user
from slurm_mm.agent.steps import multi_node_reason, node_count, step_clients, steps_reason


@pytest.mark.parametrize("nodelist, count", [
    ("", 0), ("n1", 1), ("n[1-2]", 2), ("n1,n3", 2), ("n[1-3],m5", 4), ("n[1,3-5]", 4),
    ("rack[1-2]-n[1-4]", 8), ("node-7", 1),
])
def test_node_count_of_hostlists(nodelist, count):
    assert node_count(nodelist) == count


def test_single_node_job_is_not_refused():
    assert multi_node_reason("n2") is None


def test_multi_node_job_reason_names_the_nodes():
    text = multi_node_reason("n[1-2]")
    assert "allocated 2 nodes (n[1-2])" in text and "no images" in text


def _spawn(tmp_path: Path, exe_name: str, argv0: str) -> subprocess.Popen:
    exe = tmp_path / exe_name
    shutil.copy("/bin/sleep", exe)
    proc = subprocess.Popen(["bash", "-c", f'exec -a {argv0} "$0" 30', str(exe)])
    deadline = time.monotonic() + 5
    while Path(f"/proc/{proc.pid}/exe").resolve() != exe.resolve():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return proc


def test_srun_client_is_found_by_its_executable(tmp_path):
    proc = _spawn(tmp_path, "srun", "myapp")
    try:
        clients = step_clients([proc.pid])
        assert [c.pid for c in clients] == [proc.pid]
        assert "myapp 30" in steps_reason(clients)
    finally:
        proc.kill()
        proc.wait()


def test_other_programs_named_srun_in_argv_are_not_clients(tmp_path):
    proc = _spawn(tmp_path, "sleepy", "srun")
    try:
        assert step_clients([proc.pid, 999999999]) == []
    finally:
        proc.kill()
        proc.wait()


def test_retention_keeps_the_pins_of_step_tasks_too():
    extra = {"files": {"pins": "dump-1"},
             "steps": {"0123456789abcdef": {"files": {"0": {"pins": "dump-1@0123456789abcdef@0"},
                                                      "1": {"pins": None}}}}}
    assert image_pins(extra) == {"dump-1", "dump-1@0123456789abcdef@0"}
    assert image_pins({"files": {}, "steps": {}}) == set()
    assert image_pins({"steps": {"x": "not a record"}}) == set()  # an odd manifest names nothing


@pytest.mark.skipif(os.geteuid() != 0, reason="checks the files as their owner, with setuid")
def test_step_task_whose_files_cannot_come_back_refuses_the_image_before_anything_runs(tmp_path, request):
    owner = ensure_user("mmtest")
    base = Path(tempfile.mkdtemp(prefix="slurm_mm-steps-"))  # a path the owner can reach
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    base.chmod(0o755)
    home = base / "home"
    home.mkdir()
    os.chown(home, owner.pw_uid, owner.pw_gid)
    data = home / "input.dat"
    data.write_bytes(b"x" * 100)
    st = data.stat()
    rec = filestate.FileRecord(path=str(data), dev=st.st_dev, ino=st.st_ino, size=100, mtime_ns=st.st_mtime_ns,
                               mode=st.st_mode, uid=st.st_uid, node_local=False)
    staging = tmp_path / "staging"
    staging.mkdir()
    token = "0123456789abcdef"
    state = filestate.FileState(node="n1", records=[rec])
    (staging / f"step@{token}@0@{filestate.STATE_FILE}").write_text(json.dumps(state.to_json()))
    (staging / f"step@{token}@0@pages-1.img").write_bytes(b"")
    with open(data, "ab") as f:  # another party's edit of what the task only read
        f.write(b"edited")
    made: list[Path] = []

    def staging_dir(job: str, name: str) -> Path:
        made.append(tmp_path / name)
        made[-1].mkdir()
        return made[-1]

    checkpointer = SimpleNamespace(staging_beside=lambda near, name: staging_dir("7", name),
                                   pin_root=lambda job: tmp_path / "pins")
    sup = SimpleNamespace(job_id="7", services=SimpleNamespace(checkpointer=checkpointer, node="n2"),
                          req=SimpleNamespace(owner=Owner(owner.pw_uid, owner.pw_gid, (owner.pw_gid,))))
    steps = JobSteps(sup)
    with pytest.raises(FileStateRefused, match=r"task 0 of step `srun app`: .*input.dat: size 100 -> 106"):
        steps.unpack(staging, {token: {"argv": ["app"], "ranks": [0]}})
    assert made and not any(p.exists() for p in made) and steps.unpacked == {}


# ---------------------------------------------------------------- step output in flight

def test_pipe_bytes_counts_what_waits_in_a_pipe_and_nothing_else(tmp_path):
    from slurm_mm.agent.step_drain import pipe_bytes
    r, w = os.pipe()
    try:
        os.write(w, b"x" * 1000)
        assert pipe_bytes(w) == 1000 and pipe_bytes(r) == 1000
        with open(tmp_path / "f", "wb") as f:
            f.write(b"y" * 50)
            assert pipe_bytes(f.fileno()) == 0
    finally:
        os.close(r)
        os.close(w)


def test_output_in_flight_until_the_task_pipe_is_read_empty():
    from slurm_mm.agent.step_drain import in_flight
    r, w = os.pipe()
    try:
        os.write(w, b"z" * 5000)
        assert "5000 bytes of a task's output" in in_flight([w], [], 0.2)
        reader = subprocess.Popen(["sh", "-c", "sleep 0.3; cat > /dev/null"], stdin=r)
        os.close(r)
        r = -1
        started = time.monotonic()
        assert in_flight([w], [], 5) is None
        assert time.monotonic() - started >= 0.3
    finally:
        if r >= 0:
            os.close(r)
        os.close(w)
    reader.wait(5)


def test_an_srun_whose_destination_pipe_is_full_still_holds_output():
    from slurm_mm.agent.step_drain import in_flight
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"q" * 4096)
    except BlockingIOError:
        pass
    srun = subprocess.Popen(["sleep", "30"], stdout=w)
    try:
        assert "the pipe srun (pid" in in_flight([], [srun.pid], 0.3)
        os.read(r, 65536)
        assert in_flight([], [srun.pid], 2) is None
    finally:
        srun.kill()
        srun.wait()
        os.close(r)
        os.close(w)


def test_unfinished_names_the_processes_still_running_after_the_wait():
    from slurm_mm.agent.step_drain import unfinished
    quick, slow = subprocess.Popen(["true"]), subprocess.Popen(["sleep", "30"])
    try:
        assert unfinished([quick, slow], 0.5) == [slow]
    finally:
        slow.kill()
        slow.wait()
