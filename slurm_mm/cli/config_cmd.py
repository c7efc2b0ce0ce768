"""`slurm-mm config check [FILE]`: validate a configuration file."""

from __future__ import annotations

import argparse
from pathlib import Path

from slurm_mm import config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="inspect slurm_mm's configuration")
    csub = p.add_subparsers(dest="config_command", required=True)
    check = csub.add_parser("check", help="validate a config file (default: the active one)")
    check.add_argument("file", nargs="?", type=Path, help="config file (default: $SLURM_MM_CONFIG or /etc/slurm_mm/config.yaml)")
    check.add_argument("--show", action="store_true", help="print the effective configuration")
    check.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    path = args.file or config.config_path()
    cfg = config.load(path)
    print(f"{path}: ok")
    if args.show:
        print(config.dump(cfg), end="")
    return 0
