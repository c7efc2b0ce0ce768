"""What the slurm_mm SPANK plugin is configured with, read from Slurm's config files.

The plugin takes its settings from its plugstack.conf line; `slurm-mm config check`
shows them beside the agent's so an admin sees the effective values of both and any
disagreement (an agent listening where the plugin does not look turns checkpointing
off for every job). Reads files only; never runs Slurm commands.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from slurm_mm import defaults
from slurm_mm.durations import parse_interval
from slurm_mm.errors import ConfigError, UsageError

PLUGIN_NAME = Path(defaults.SPANK_PLUGIN).name


@dataclass(frozen=True)
class PluginSettings:
    """The plugin's effective settings and where they came from."""

    source: str  # "plugstack.conf:LINE" or "defaults (no slurm_mm line found)"
    plugin: str  # the .so path on that line
    required: bool
    min_interval: int
    run_wrapper: str
    agent_socket: str


def slurm_conf_path() -> Path:
    return Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))


def plugstack_path(slurm_conf: Path) -> Path:
    """PlugStackConfig from slurm.conf, else plugstack.conf beside it (Slurm's default)."""
    try:
        text = slurm_conf.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return slurm_conf.parent / "plugstack.conf"
    for line in text.splitlines():
        key, sep, value = line.split("#", 1)[0].strip().partition("=")
        if sep and key.strip().lower() == "plugstackconfig":
            return Path(value.strip())
    return slurm_conf.parent / "plugstack.conf"


def _lines(path: Path, depth: int = 0) -> list[tuple[str, list[str]]]:
    """(source, words) of every directive, following `include` globs."""
    if depth > 8:
        raise ConfigError(f"{path}: include nesting too deep")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ConfigError(f"cannot read plugstack config '{path}': {exc.strerror}") from None
    out: list[tuple[str, list[str]]] = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] == "include":
            for pattern in words[1:]:
                full = pattern if pattern.startswith("/") else str(path.parent / pattern)
                for match in sorted(glob.glob(full)):
                    out += _lines(Path(match), depth + 1)
        else:
            out.append((f"{path}:{number}", words))
    return out


def plugin_settings_defaults() -> PluginSettings:
    """The plugin's settings on a plugstack line with no arguments."""
    d = defaults.PLUGIN_DEFAULTS
    return PluginSettings(source="built-in defaults", plugin=defaults.SPANK_PLUGIN, required=True,
                          min_interval=int(d["min_interval"]), run_wrapper=str(d["run_wrapper"]),
                          agent_socket=str(d["agent_socket"]))


def plugin_settings(plugstack: Path) -> PluginSettings:
    """The slurm_mm line's settings; the built-in defaults when no line loads the plugin."""
    values: dict[str, object] = dict(defaults.PLUGIN_DEFAULTS)
    for source, words in _lines(plugstack):
        if len(words) < 2 or Path(words[1]).name != PLUGIN_NAME:
            continue
        for arg in words[2:]:
            key, sep, value = arg.partition("=")
            if not sep or key not in values:
                raise ConfigError(f"{source}: unknown slurm_mm argument '{arg}'")
            if key == "min_interval":
                try:
                    seconds = parse_interval(value)
                except UsageError:
                    seconds = 0
                if seconds <= 0:
                    raise ConfigError(f"{source}: invalid min_interval '{value}'")
                values[key] = seconds
            elif not value.startswith("/") or ".." in value:
                raise ConfigError(f"{source}: {key} must be an absolute path, got '{value}'")
            else:
                values[key] = value
        return PluginSettings(source=source, plugin=words[1], required=words[0] == "required",
                              min_interval=int(values["min_interval"]),
                              run_wrapper=str(values["run_wrapper"]),
                              agent_socket=str(values["agent_socket"]))
    return PluginSettings(source=f"defaults (no {PLUGIN_NAME} line in {plugstack})", plugin="",
                          required=False, min_interval=int(values["min_interval"]),
                          run_wrapper=str(values["run_wrapper"]),
                          agent_socket=str(values["agent_socket"]))
