"""`python -m slurm_mm.agent --node NAME`: run the node agent (as root, beside slurmd)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from slurm_mm import config
from slurm_mm.errors import SlurmMMError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slurm-mm-agent", description=__doc__)
    parser.add_argument("--node", default=os.uname().nodename, help="Slurm node name (default: hostname)")
    parser.add_argument("--socket", type=Path, help="socket path (default: config agent_socket)")
    parser.add_argument("--pid-file", type=Path)
    parser.add_argument("--poll-interval", type=float, default=5.0,
                        help="seconds between polls of Slurm for preemption and drains")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s slurm_mm-agent[{args.node}] %(levelname)s %(message)s")
    if os.geteuid() != 0:
        print("slurm-mm-agent: error: must run as root", file=sys.stderr)
        return 1
    try:
        cfg = config.load(require_safe_owner=True)
        logging.getLogger().setLevel(config.log_level(cfg))
        from slurm_mm.store.acl_support import require_acls  # noqa: PLC0415

        require_acls(cfg)  # images must be readable by their owner alone
        from slurm_mm.agent import metrics  # noqa: PLC0415

        metrics.configure(cfg.metrics_dir, args.node)
        from slurm_mm.agent.node_agent import NodeAgent  # noqa: PLC0415
        from slurm_mm.checkpointer import JobCheckpointer, open_store  # noqa: PLC0415
        from slurm_mm.slurm.client import connect  # noqa: PLC0415

        checkpointer = JobCheckpointer(cfg, open_store(cfg), args.node)
        agent = NodeAgent(args.node, cfg, connect(), checkpointer, poll_interval=args.poll_interval)
    except SlurmMMError as exc:
        print(f"slurm-mm-agent: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.pid_file:
        args.pid_file.write_text(f"{os.getpid()}\n")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    from slurm_mm.agent import store_usage  # noqa: PLC0415

    store_usage.start(checkpointer.store, metrics.registry, agent.stopping)
    from slurm_mm.agent import store_sweep  # noqa: PLC0415

    store_sweep.start(checkpointer.store, agent.slurm, args.node, cfg.store_sweep_interval, agent.stopping)
    agent.serve(args.socket or config.agent_socket(cfg, args.node))
    return 0


if __name__ == "__main__":
    sys.exit(main())
