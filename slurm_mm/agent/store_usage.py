"""Store usage per job owner, as a gauge of the agent's metrics.

Every few minutes the agent reads the manifests of the images in the shared store and
sets `slurm_mm_store_usage_bytes{uid}` (stored bytes of complete images, by the uid
recorded in each manifest, plus the job's file pins, as store_quota_per_user counts them) and `slurm_mm_store_images{uid}`. The value is the whole
store's, so every agent reports the same: aggregate with max() by uid, not sum().
Reads manifests only, never image data; runs at idle I/O cost once per interval.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import defaultdict

from pathlib import Path

from slurm_mm.agent.metrics import Metrics
from slurm_mm.agent.quota import PIN_DIR, pin_bytes
from slurm_mm.store import ImageStore

log = logging.getLogger(__name__)
INTERVAL = 300.0  # seconds between two scans of the store


def usage_by_owner(store: ImageStore) -> tuple[dict[int, int], dict[int, int]]:
    """(stored bytes, image count) per owner uid, over every job in the store."""
    used: dict[int, int] = defaultdict(int)
    count: dict[int, int] = defaultdict(int)
    pinned: dict[int, set[tuple[int, int]]] = defaultdict(set)
    try:
        names = [e.name for e in os.scandir(store.root) if e.name.isdigit() and e.is_dir(follow_symlinks=False)]
    except OSError as exc:
        log.warning("cannot list the store %s: %s", store.root, exc)
        return {}, {}
    for job_id in names:
        try:
            images = store.images(job_id)
        except Exception as exc:  # noqa: BLE001 - one unreadable job must not stop the scan
            log.debug("store usage: skipping job %s: %s", job_id, exc)
            continue
        for image in images:
            uid = int(image.manifest.uid)
            used[uid] += image.manifest.stored_size
            count[uid] += 1
        if images:
            uid = int(images[0].manifest.uid)
            used[uid] += pin_bytes(Path(store.root) / job_id / PIN_DIR, None, pinned[uid])
    return dict(used), dict(count)


def publish(store: ImageStore, registry: Metrics) -> None:
    used, count = usage_by_owner(store)
    registry.replace("slurm_mm_store_usage_bytes", {str(uid): float(v) for uid, v in used.items()}, "uid")
    registry.replace("slurm_mm_store_images", {str(uid): float(v) for uid, v in count.items()}, "uid")
    registry.write()


def start(store: ImageStore, registry: Metrics, stopping: threading.Event, interval: float = INTERVAL) -> threading.Thread:
    """Scan now and then every `interval` seconds until `stopping` is set."""

    def loop() -> None:
        while True:
            try:
                publish(store, registry)
            except Exception as exc:  # noqa: BLE001 - metrics never take the agent down
                log.warning("store usage scan failed: %s", exc)
            if stopping.wait(interval):
                return

    thread = threading.Thread(target=loop, name="store-usage", daemon=True)
    thread.start()
    return thread
