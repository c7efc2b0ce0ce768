"""Image store: checkpoint images on a shared filesystem (layout, manifest, zstd, checksums,
atomic commit, retention, locks, epoch fencing, safe file access, permissions).

Knows files, compression and locks; never processes or Slurm.
"""

from slurm_mm.store.image_store import Image, ImageStore, Progress, Skipped
from slurm_mm.store.manifest import FORMAT_VERSION, TRIGGERS, FileEntry, Manifest, Trigger

__all__ = ["FORMAT_VERSION", "TRIGGERS", "FileEntry", "Image", "ImageStore", "Manifest", "Progress", "Skipped", "Trigger"]
