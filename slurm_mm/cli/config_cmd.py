"""`slurm-mm config check [FILE]`: validate slurm_mm's configuration, agent and plugin.

The agent reads config.yaml; the SPANK plugin reads its plugstack.conf line. Both have
the same built-in defaults (slurm_mm/defaults.py), but a site can set them apart: an
agent socket the plugin does not know, or a plugin line pointing at a missing wrapper,
leaves every enrolled job unprotected; a store on a filesystem without POSIX ACLs
would let users of one group read each other's images. `check` refuses those with one
line each.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml

from slurm_mm import config
from slurm_mm.errors import ConfigError
from slurm_mm.slurm import plugstack
from slurm_mm.store.acl_support import require_acls


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="inspect slurm_mm's configuration")
    csub = p.add_subparsers(dest="config_command", required=True)
    check = csub.add_parser("check", help="validate a config file (default: the active one)")
    check.add_argument("file", nargs="?", type=Path, help="config file (default: $SLURM_MM_CONFIG or /etc/slurm_mm/config.yaml)")
    check.add_argument("--show", action="store_true", help="print the effective configuration (agent and plugin)")
    check.add_argument("--plugstack", type=Path,
                       help="plugstack.conf to read the plugin's line from (default: PlugStackConfig of $SLURM_CONF)")
    check.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    path = args.file or config.config_path()
    cfg = config.load(path)
    stack = args.plugstack or plugstack.plugstack_path(plugstack.slurm_conf_path())
    plugin = plugstack.plugin_settings(stack) if stack.exists() or args.plugstack else None
    if plugin is not None:
        _check_agreement(cfg, plugin)
    acl_note = ""
    if os.geteuid() == 0:
        require_acls(cfg)
    elif cfg.no_acl_fallback != "group":
        acl_note = " (POSIX ACL support of checkpoint_root not checked: run as root)"
    print(f"{path}: ok{acl_note}")
    if plugin is not None:
        print(f"{plugin.source}: ok")
    if args.show:
        print(f"# agent ({path}; unset keys are the built-in defaults)")
        print(config.dump(cfg), end="")
        print("# SPANK plugin (" + (plugin.source if plugin else f"{stack} not found: built-in defaults") + ")")
        settings = plugin or plugstack.plugin_settings_defaults()
        print(yaml.safe_dump({"spank_plugin": {
            "min_interval": settings.min_interval, "run_wrapper": settings.run_wrapper,
            "agent_socket": settings.agent_socket}}, sort_keys=False), end="")
    return 0


def _check_agreement(cfg: config.Config, plugin: plugstack.PluginSettings) -> None:
    if plugin.agent_socket != str(cfg.agent_socket):
        raise ConfigError(
            f"{plugin.source}: agent_socket '{plugin.agent_socket}' differs from the agent's "
            f"'{cfg.agent_socket}': enrolled jobs would not reach the agent")
    if plugin.min_interval < cfg.min_interval:
        raise ConfigError(
            f"{plugin.source}: min_interval {plugin.min_interval}s is below the agent's "
            f"min_interval {cfg.min_interval}s: the agent would silently stretch shorter intervals")
