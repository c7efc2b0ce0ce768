"""Prolog/Epilog logging: the site's log_level, and one line per hook run (no Slurm needed)."""

from __future__ import annotations

import logging
import os

import pytest

from slurm_mm import hooks

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the config must be root-owned")


def run_with(tmp_path, monkeypatch, level: str) -> int:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"checkpoint_root: {tmp_path / 'store'}\nlog_level: {level}\n")
    cfg.chmod(0o644)
    monkeypatch.setenv("SLURM_MM_CONFIG", str(cfg))
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    monkeypatch.setenv("SPANK_SLURM_MM_INTERVAL", "60")
    seen = {}

    def prolog(env):
        seen["level"] = logging.getLogger().level
        seen["job"] = env["SLURM_JOB_ID"]

    assert hooks.run(prolog) == 0
    assert seen["job"] == "12"
    return seen["level"]


def test_hooks_run_at_the_configured_log_level(tmp_path, monkeypatch):
    assert run_with(tmp_path, monkeypatch, "error") == logging.ERROR
    assert run_with(tmp_path, monkeypatch, "debug") == logging.DEBUG


def test_a_bad_config_is_one_line_and_the_job_goes_on(tmp_path, monkeypatch, caplog):
    cfg = tmp_path / "config.yaml"
    cfg.write_text("log_level: loud\n")
    monkeypatch.setenv("SLURM_MM_CONFIG", str(cfg))
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    monkeypatch.setenv("SPANK_SLURM_MM_INTERVAL", "60")
    assert hooks.run(hooks.prolog) == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "'log_level'" in errors[0].getMessage() and "'loud'" in errors[0].getMessage()
    assert errors[0].exc_info is None
