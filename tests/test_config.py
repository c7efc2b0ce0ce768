"""Config loading: defaults, validation with one-line errors naming key and value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_mm import config
from slurm_mm.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_valid_file_loads(tmp_path):
    cfg = config.load(write(tmp_path, "checkpoint_root: /shared/ckpt\nkeep_images: 5\ntimeouts:\n  lock: 30\n"))
    assert cfg.checkpoint_root == Path("/shared/ckpt")
    assert cfg.keep_images == 5
    assert cfg.timeouts.lock == 30.0
    assert cfg.compression_level == config.Config().compression_level


def test_commit_read_back_reaches_the_store(tmp_path):
    from slurm_mm.checkpointer import open_store  # noqa: PLC0415
    cfg = config.load(write(tmp_path, f"checkpoint_root: {tmp_path}/ckpt\ncommit_read_back: device\n"))
    assert cfg.commit_read_back == "device"
    assert open_store(cfg).read_back == "device"
    assert open_store(config.Config(checkpoint_root=tmp_path / "c")).read_back == "auto"


def test_dump_round_trips(tmp_path):
    cfg = config.Config(keep_images=7)
    assert config.load(write(tmp_path, config.dump(cfg))) == cfg


@pytest.mark.parametrize("text,needle", [
    ("bogus_key: 1\n", "unknown key 'bogus_key'"),
    ("timeouts:\n  gpu_call: 30\n", "unknown key 'timeouts.gpu_call' (removed"),
    ("keep_images: many\n", "'keep_images' must be an integer, got 'many'"),
    ("keep_images: 0\n", "'keep_images' must be between 1 and 1000, got 0"),
    ("compression_level: 40\n", "'compression_level' must be between 1 and 22, got 40"),
    ("checkpoint_root: relative/dir\n", "'checkpoint_root' must be an absolute path, got 'relative/dir'"),
    ("checkpoint_root: /a/../etc\n", "must not contain '..'"),
    ("async_checkpoints: 1\n", "'async_checkpoints' must be true or false, got 1"),
    ("timeouts:\n  restore: -1\n", "'timeouts.restore' must be a positive number, got -1"),
    ("timeouts:\n  nap: 1\n", "unknown key 'timeouts.nap'"),
    ("log_level: loud\n", "'log_level' must be one of"),
    ("commit_read_back: disk\n", "'commit_read_back' must be auto, cache or device, got 'disk'"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("keep_images: [\n", "not valid YAML"),
])
def test_bad_values_are_one_line_errors(tmp_path, text, needle):
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, text))
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_symlinked_config_is_refused(tmp_path):
    real = write(tmp_path, "keep_images: 2\n")
    link = tmp_path / "link.yaml"
    link.symlink_to(real)
    with pytest.raises(ConfigError):
        config.load(link)


def test_root_run_code_refuses_writable_config(tmp_path):
    path = write(tmp_path, "keep_images: 2\n")
    os.chmod(path, 0o666)
    with pytest.raises(ConfigError, match="must be owned by root"):
        config.load(path, require_safe_owner=True)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slurm_mm.cli", *args],
                          capture_output=True, text=True, env=env)


def test_cli_config_check_reports_ok_and_errors(tmp_path):
    good = write(tmp_path, "keep_images: 2\n")
    ok = _cli("config", "check", str(good))
    assert ok.returncode == 0 and ": ok" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("keep_images: -3\n")
    res = _cli("config", "check", str(bad))
    assert res.returncode == 2
    assert res.stderr.strip() == f"slurm-mm: error: {bad}: 'keep_images' must be between 1 and 1000, got -3"


def test_cli_config_check_uses_env_override(tmp_path):
    bad = write(tmp_path, "wat: 1\n")
    res = _cli("config", "check", env={**os.environ, "SLURM_MM_CONFIG": str(bad)})
    assert res.returncode == 2 and "unknown key 'wat'" in res.stderr
