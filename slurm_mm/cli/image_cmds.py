"""`slurm-mm images`, `verify`, `restore`, `gc` and `checkpoint --pid`: image-level commands.

A job's images live in `<checkpoint_root>/<job id>/`; these commands also accept such a
directory path directly (the first-cut, Slurm-free interface).
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from tabulate import tabulate

from slurm_mm import config
from slurm_mm.checkpointer import open_store
from slurm_mm.cli.common import store_and_job
from slurm_mm.errors import ImageCorrupt, NoImage, UsageError
from slurm_mm.store import Image, ImageStore
from slurm_mm.store.manifest import MANIFEST_NAME


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("images", help="list a job's checkpoint images")
    p.add_argument("job", help="job id, or a job directory of images")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_images)

    v = sub.add_parser("verify", help="check an image's files against its manifest")
    v.add_argument("image", type=Path, help="an image directory (…/<job>/ckpt-NNNNNN)")
    v.set_defaults(func=run_verify)

    r = sub.add_parser("restore", help="restore the newest verified image of a job directory (root)")
    r.add_argument("dir", type=Path, help="job directory of images")
    r.add_argument("--detach", action="store_true", help="do not wait for the restored tree")
    r.set_defaults(func=run_restore)

    g = sub.add_parser("gc", help="apply retention and remove partial images; with no job, also the images "
                                  "of jobs Slurm says ended for good (root)")
    g.add_argument("job", nargs="?", help="job id or job directory (default: every job)")
    g.set_defaults(func=run_gc)


def image_at(path: Path) -> tuple[ImageStore, Image]:
    """The image stored at `…/<job>/<image>`."""
    if ".." in path.parts:
        raise UsageError(f"'{path}' must not contain '..'")
    path = path.absolute()
    store = open_store(config.load(), path.parent.parent)
    for image in store.images(path.parent.name):
        if image.path.name == path.name:
            return store, image
    if (path / MANIFEST_NAME).exists():
        raise ImageCorrupt(f"{path} has a manifest but is not a complete image of job {path.parent.name}")
    raise NoImage(f"no image at {path}")


def _row(image: Image) -> dict:
    m = image.manifest
    return {"image": image.path.name, "created": m.created, "trigger": m.trigger, "epoch": m.epoch,
            "node": m.node, "files": len(m.files), "size": sum(f.size for f in m.files),
            "stored": sum(f.stored_size for f in m.files), "gpu": bool(m.gpu), "path": str(image.path)}


def run_images(args: argparse.Namespace) -> int:
    store, job = store_and_job(args.job)
    rows = [_row(i) for i in store.images(job)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"job {job}: no complete images")
        return 0
    table = [[r["image"], datetime.datetime.fromtimestamp(r["created"]).strftime("%Y-%m-%d %H:%M:%S"),
              r["trigger"], r["epoch"], r["node"], f"{r['size'] / 2**20:.1f}", f"{r['stored'] / 2**20:.1f}",
              "yes" if r["gpu"] else "no"] for r in rows]
    print(tabulate(table, headers=["image", "created", "trigger", "epoch", "node", "MiB", "stored MiB", "gpu"]))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    store, image = image_at(args.image)
    store.verify(image)
    print(f"{image.path}: ok ({len(image.manifest.files)} files verified)")
    return 0


def run_gc(args: argparse.Namespace) -> int:
    ended: set[str] = set()
    if args.job:
        store, job = store_and_job(args.job)
        jobs = [job]
    else:
        store = open_store(config.load())
        jobs = sorted(p.name for p in store.root.iterdir() if p.name.isdigit()) if store.root.is_dir() else []
        from slurm_mm.agent.store_sweep import sweep  # noqa: PLC0415
        from slurm_mm.slurm.client import connect  # noqa: PLC0415

        ended = set(sweep(store, connect(), None))
        for job in sorted(ended):
            print(f"removed {store.root / job} (the job ended for good)")
        jobs = [job for job in jobs if job not in ended]
    removed = [p for job in jobs for p in store.gc(job)]
    for path in removed:
        print(f"removed {path}")
    print(f"{len(removed) + len(ended)} removed")
    return 0


def run_restore(args: argparse.Namespace) -> int:
    from slurm_mm.cli.pid_cmds import restore_dir  # noqa: PLC0415

    return restore_dir(args)


def checkpoint_pid(args: argparse.Namespace) -> int:
    from slurm_mm.cli.pid_cmds import checkpoint_pid as run  # noqa: PLC0415

    return run(args)
