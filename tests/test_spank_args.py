"""The SPANK plugin's plugstack.conf arguments: defaults from the one table, bad input refused.

Runs spank/mm_args.c through its test driver (spank/mm_args_check) and inspects the
built plugin's exported symbols; no Slurm daemon needed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from slurm_mm import config, defaults

REPO = Path(__file__).resolve().parents[1]
SPANK = REPO / "spank"


@pytest.fixture(scope="module")
def driver() -> Path:
    subprocess.run(["make", "-s", "-C", str(SPANK), "mm_args_check", "slurm_mm_spank.so"], check=True)
    return SPANK / "mm_args_check"


def parse(driver: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(driver), "config", *args], capture_output=True, text=True, timeout=10)


def values(proc: subprocess.CompletedProcess) -> dict[str, str]:
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines())


def test_plugstack_line_without_arguments_gets_every_default(driver):
    got = values(parse(driver))
    assert got == {k: str(v) for k, v in defaults.PLUGIN_DEFAULTS.items()}
    assert got["agent_socket"], "an empty agent_socket silently turns checkpointing off"


def test_plugin_and_agent_defaults_agree(driver):
    got = values(parse(driver))
    cfg = config.Config()
    assert got["agent_socket"] == str(cfg.agent_socket)
    assert int(got["min_interval"]) == cfg.min_interval


def test_arguments_override_defaults(driver):
    got = values(parse(driver, "min_interval=5m", "run_wrapper=/usr/bin/slurm-mm-run",
                       "agent_socket=/run/x/%n.sock"))
    assert got == {"min_interval": "300", "run_wrapper": "/usr/bin/slurm-mm-run",
                   "agent_socket": "/run/x/%n.sock"}


@pytest.mark.parametrize("arg,message", [
    ("agent_socket=", "agent_socket must be an absolute path, got ''"),
    ("agent_socket=run/agent.sock", "got 'run/agent.sock'"),
    ("agent_socket=/run/../etc/x", "got '/run/../etc/x'"),
    ("agent_socket=/run/" + "a" * 120, "agent_socket must be an absolute path"),
    ("agent_socket=/run/a b", "must not contain spaces"),
    ("run_wrapper=", "run_wrapper must be an absolute path, got ''"),
    ("run_wrapper=slurm-mm-run", "got 'slurm-mm-run'"),
    ("min_interval=", "invalid min_interval ''"),
    ("min_interval=off", "invalid min_interval 'off'"),
    ("min_interval=0", "invalid min_interval '0'"),
    ("min_interval=5x", "invalid min_interval '5x'"),
    ("min_interval=-5", "invalid min_interval '-5'"),
    ("min_interval=99999999999999999999", "invalid min_interval"),
    ("agent_sock=/run/x", "unknown argument 'agent_sock=/run/x'"),
    ("required", "unknown argument 'required'"),
    ("", "unknown argument ''"),
])
def test_bad_argument_is_refused_with_one_line_naming_it(driver, arg, message):
    proc = parse(driver, "min_interval=5m", arg)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_plugin_exports_only_spank_symbols(driver):
    out = subprocess.run(["nm", "-D", "--defined-only", str(SPANK / "slurm_mm_spank.so")],
                         capture_output=True, text=True, check=True).stdout
    names = {line.split()[-1] for line in out.splitlines() if line.strip()}
    allowed = {"plugin_name", "plugin_type", "plugin_version", "spank_plugin_version", "spank_options"}
    assert {n for n in names if not n.startswith("slurm_spank_")} <= allowed, names
    assert {"slurm_spank_init", "slurm_spank_task_init", "plugin_name"} <= names
    assert not any(n.startswith("mm_") for n in names), names
