"""The job's AdminComment names its last image, so admins see it in `scontrol show job`
and `sacct -o AdminComment` without slurm_mm's tools.

Written as `slurm_mm last_image=<name> trigger=<t> taken=<ISO-8601 UTC> stored_bytes=<n>`
(the age is now minus `taken`). Best effort, in a background thread: a slow or failing
scontrol never delays or fails a checkpoint.
"""

from __future__ import annotations

import datetime
import logging
import threading
from typing import TYPE_CHECKING

from slurm_mm.errors import SlurmMMError

if TYPE_CHECKING:
    from slurm_mm.slurm.model import SlurmClient
    from slurm_mm.store import Image

log = logging.getLogger(__name__)


def text(image: Image) -> str:
    m = image.manifest
    taken = datetime.datetime.fromtimestamp(m.created, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (f"slurm_mm last_image={image.path.name} trigger={m.trigger} taken={taken} "
            f"stored_bytes={sum(f.stored_size for f in m.files)}")


def publish(slurm: SlurmClient, job_id: str, image: Image) -> None:
    setter = getattr(slurm, "set_admin_comment", None)
    if setter is None:
        return
    comment = text(image)

    def run() -> None:
        try:
            setter(job_id, comment)
        except SlurmMMError as exc:
            log.debug("job %s: cannot set AdminComment: %s", job_id, exc)

    threading.Thread(target=run, name=f"comment-{job_id}", daemon=True).start()
