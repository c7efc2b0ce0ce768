"""The `slurm-mm` command: a table for people, `--json` for scripts.

Each subcommand lives in its own module with `register(subparsers)`; every error is a
SlurmMMError printed as one line (`slurm-mm: error: ...`) with its exit code — never a
traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from slurm_mm import __version__
from slurm_mm.errors import SlurmMMError

from . import config_cmd, image_cmds, job_cmds

COMMAND_MODULES = [job_cmds, image_cmds, config_cmd]


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line naming the bad value (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="slurm-mm", description="Checkpoint/restore of Slurm batch jobs.")
    parser.add_argument("--version", action="version", version=f"slurm_mm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="slurm-mm: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except SlurmMMError as exc:
        print(f"slurm-mm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("slurm-mm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
