"""`slurm-mm config check --show`: the agent's and the plugin's effective values, and
the disagreements between them that would leave enrolled jobs unprotected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from slurm_mm import defaults


def run(tmp_path: Path, config_text: str, plugstack_text: str | None, *args: str):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(config_text)
    argv = [sys.executable, "-m", "slurm_mm.cli", "config", "check", str(cfg), *args]
    if plugstack_text is not None:
        stack = tmp_path / "plugstack.conf"
        stack.write_text(plugstack_text)
        argv += ["--plugstack", str(stack)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin", "SLURM_CONF": str(tmp_path / "none.conf")})


def test_show_prints_plugin_defaults_for_a_bare_plugstack_line(tmp_path):
    proc = run(tmp_path, "keep_images: 4\n", f"required {defaults.SPANK_PLUGIN}\n", "--show")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "keep_images: 4" in out
    assert f"agent_socket: {defaults.AGENT_SOCKET}" in out.split("# SPANK plugin")[1]
    assert f"run_wrapper: {defaults.RUN_WRAPPER}" in out
    assert f"min_interval: {defaults.MIN_INTERVAL}" in out.split("# SPANK plugin")[1]


def test_show_prints_plugin_arguments(tmp_path):
    proc = run(tmp_path, "min_interval: 5\nagent_socket: /run/t/%n.sock\n",
               f"# comment\noptional /x/{Path(defaults.SPANK_PLUGIN).name} min_interval=5m agent_socket=/run/t/%n.sock\n",
               "--show")
    assert proc.returncode == 0, proc.stderr
    plugin = proc.stdout.split("# SPANK plugin")[1]
    assert "min_interval: 300" in plugin and "agent_socket: /run/t/%n.sock" in plugin


def test_plugin_and_agent_on_different_sockets_is_refused(tmp_path):
    proc = run(tmp_path, "agent_socket: /run/a/agent.sock\n",
               f"required {defaults.SPANK_PLUGIN} agent_socket=/run/b/agent.sock\n")
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "agent_socket '/run/b/agent.sock' differs" in proc.stderr


def test_plugin_minimum_below_agent_minimum_is_refused(tmp_path):
    proc = run(tmp_path, "min_interval: 600\n", f"required {defaults.SPANK_PLUGIN} min_interval=1m\n")
    assert proc.returncode != 0 and "min_interval 60s is below the agent's" in proc.stderr


@pytest.mark.parametrize("arg,needle", [
    ("agent_socket=", "agent_socket must be an absolute path, got ''"),
    ("min_interval=soon", "invalid min_interval 'soon'"),
    ("bogus=1", "unknown slurm_mm argument 'bogus=1'"),
])
def test_bad_plugstack_argument_is_one_line(tmp_path, arg, needle):
    proc = run(tmp_path, "", f"required {defaults.SPANK_PLUGIN} {arg}\n")
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr and "Traceback" not in proc.stderr


def test_plugstack_include_is_followed(tmp_path):
    (tmp_path / "plugstack.conf.d").mkdir()
    (tmp_path / "plugstack.conf.d" / "mm.conf").write_text(
        f"required {defaults.SPANK_PLUGIN} min_interval=2h\n")
    proc = run(tmp_path, "", f"include {tmp_path}/plugstack.conf.d/*.conf\n", "--show")
    assert proc.returncode == 0, proc.stderr
    assert "min_interval: 7200" in proc.stdout.split("# SPANK plugin")[1]


def test_shipped_plugstack_conf_agrees_with_default_config(tmp_path):
    shipped = Path(__file__).resolve().parents[1] / "contrib" / "slurm" / "plugstack.conf"
    proc = run(tmp_path, "", shipped.read_text())
    assert proc.returncode == 0, proc.stderr


def test_shipped_config_yaml_shows_the_built_in_defaults():
    from slurm_mm import config
    shipped = Path(__file__).resolve().parents[1] / "contrib" / "slurm" / "config.yaml"
    assert config.load(shipped) == config.Config()
