"""The demo's verdict (contrib/demo/demo.py) fails every way a resumed job can be wrong."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "contrib" / "demo"
spec = importlib.util.spec_from_file_location("demo_under_test", DEMO / "demo.py")
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)

EXPECTED = subprocess.run([sys.executable, str(DEMO / "workload.py"), "60", "--fast"],
                          capture_output=True, text=True, check=True).stdout.splitlines()
DONE = {"JobState": "COMPLETED", "Restarts": "1"}


def resumed(at: int) -> list[str]:
    """The output of a run preempted after line `at` and restored from an image taken there."""
    return (EXPECTED[:at] + ["slurm_mm: checkpointed to ckpt-000002 for preempt; requeueing",
                             "slurmstepd-n1: error: *** JOB 1 ON n1 CANCELLED AT x DUE TO JOB REQUEUE ***",
                             "slurm_mm: restored from ckpt-000002"] + EXPECTED[at:])


def test_correct_resume_passes():
    assert demo.verdict("1", DONE, "\n".join(resumed(3)) + "\n", EXPECTED) == 0


@pytest.mark.parametrize("output,info", [
    (EXPECTED[:3] + EXPECTED, DONE),                   # started twice (rerun from the start)
    (EXPECTED[:4] + EXPECTED[3:], DONE),               # a step repeated (older image)
    (EXPECTED[:3] + EXPECTED[4:], DONE),               # a step lost
    (EXPECTED[:-1], DONE),                             # no result
    (EXPECTED, {"JobState": "COMPLETED", "Restarts": "2"}),  # requeued again after completing
    (EXPECTED, {"JobState": "FAILED", "Restarts": "1"}),
])
def test_wrong_resume_fails(output, info):
    assert demo.verdict("1", info, "\n".join(output) + "\n", EXPECTED) == 1
