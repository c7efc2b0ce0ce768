"""Can CRIU restore start before its pages file is complete? Feed the pages file through a
FIFO and see (could restore overlap reading the store with CRIU?).

    python3 benchmarks/fifo_restore.py [--mib 256]

as root, under the cluster lock (it runs CRIU). A bench-app job (slurm_mm's launcher,
user nobody) is dumped by the engine; then the same image is restored twice by the
engine: once with pages-*.img a regular file (the control), once with pages-*.img a FIFO
that a thread fills from the real file. Prints one JSON line per attempt: whether the
restore worked, how long it took, and CRIU's error if not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from jobs import CRIU, Job  # noqa: E402

from slurm_mm.engine.checkpoint import checkpoint_tree  # noqa: E402
from slurm_mm.engine.restore import restore_tree  # noqa: E402
from slurm_mm.errors import SlurmMMError  # noqa: E402


def feed(fifo: Path, source: Path, done: dict) -> None:
    try:
        fd = os.open(fifo, os.O_WRONLY)  # blocks until CRIU opens it
        with open(source, "rb") as src:
            while chunk := src.read(1 << 20):
                os.write(fd, chunk)
        os.close(fd)
        done["fed"] = True
    except OSError as exc:
        done["error"] = exc.strerror


def attempt(images: Path, pages: Path, real: Path, mode: str, job: Job) -> dict:
    pages.unlink(missing_ok=True)
    done: dict = {}
    feeder = None
    if mode == "fifo":
        os.mkfifo(pages, 0o600)
        feeder = threading.Thread(target=feed, args=(pages, real, done), daemon=True)
        feeder.start()
    else:
        shutil.copyfile(real, pages)
    t0 = time.monotonic()
    row = {"mode": mode}
    try:
        restored = restore_tree(images, criu=CRIU, timeout=60, owner_uid=65534, owner_gids=[65534])
        row.update(ok=True, seconds=round(time.monotonic() - t0, 3))
        job.adopt(restored=restored)
        row["app_iterates"] = True
        job.stop()
    except SlurmMMError as exc:
        row.update(ok=False, seconds=round(time.monotonic() - t0, 3), error=str(exc)[:300],
                   criu_log=getattr(exc, "log_excerpt", "")[-600:])
    if feeder is not None:
        if feeder.is_alive():  # CRIU never opened (or stopped reading) the FIFO: unblock the writer
            try:
                os.close(os.open(pages, os.O_RDONLY | os.O_NONBLOCK))
            except OSError:
                pass
            feeder.join(5)
        row["feeder"] = done
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/slurm_mm-fifo"))
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True, mode=0o711)
    images = args.dir / "images"
    job = Job(args.dir, args.mib, "fifo-job")
    try:
        checkpoint_tree(job.init_pid, images, leave_running=False, criu=CRIU)
        job.stop()
        pages = max(images.glob("pages-*.img"), key=lambda p: p.stat().st_size)
        real = args.dir / "pages.real"
        shutil.copyfile(pages, real)
        for mode in ("file", "fifo", "file"):
            row = attempt(images, pages, real, mode, job)
            print(json.dumps(row), flush=True)
            time.sleep(2)  # the killed tree may be reaped late: let its PIDs free up
    finally:
        try:
            job.stop()
        except Exception:  # noqa: BLE001 - cleanup
            pass
        shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
