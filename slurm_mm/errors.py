"""Error types of slurm_mm.

Every failure a user or admin can meet is one of these types, carrying the value that
was wrong. The CLI prints `str(error)` as one line and exits with `error.exit_code`;
nothing here may format a traceback.

Exit codes: 1 any other, 2 bad config or arguments, 3 unsafe path, 4 image problem,
5 checkpoint failed, 6 restore failed, 7 GPU, 8 not enrolled, 9 permission denied,
10 Slurm, 11 launch failed, 12 the agent is unreachable or spoke nonsense.
"""

from __future__ import annotations


class SlurmMMError(Exception):
    """Base of all slurm_mm errors: a one-line message and an exit code."""

    exit_code = 1

    def __str__(self) -> str:
        # One line, always: multi-line causes (CRIU logs) live in `detail`.
        return " ".join(super().__str__().split())


class ConfigError(SlurmMMError):
    """The configuration file or a config value is invalid."""

    exit_code = 2


class UsageError(SlurmMMError):
    """A command-line argument or SPANK option value is invalid."""

    exit_code = 2


class UnsafePath(SlurmMMError):
    """A path is a symlink, contains `..`, or is writable by someone it must not be."""

    exit_code = 3


class ImageError(SlurmMMError):
    """Base for problems with a stored checkpoint image."""

    exit_code = 4


class ImageCorrupt(ImageError):
    """An image's files do not match its manifest (size, checksum, missing file)."""


class ImageRefused(ImageError):
    """An image is well-formed but must not be restored here (owner, epoch, node)."""


class FileStateRefused(ImageRefused):
    """The files an image depends on are not as it recorded them and cannot be put back
    (the message names each file and its difference)."""


class NoImage(ImageError):
    """A job has no complete, verified image."""


class StaleEpoch(ImageError):
    """A writer with an older epoch (restart count) tried to commit: fenced off."""


class StoreBusy(ImageError):
    """Another writer holds the job's store lock."""


class CheckpointFailed(SlurmMMError):
    """A checkpoint did not complete; the job keeps running. Carries CRIU's log excerpt."""

    exit_code = 5

    def __init__(self, message: str, log_excerpt: str = "") -> None:
        super().__init__(message)
        self.log_excerpt = log_excerpt


class RestoreFailed(SlurmMMError):
    """A restore did not complete; nothing of it runs. Carries CRIU's log excerpt."""

    exit_code = 6

    def __init__(self, message: str, log_excerpt: str = "") -> None:
        super().__init__(message)
        self.log_excerpt = log_excerpt


class RestoreRefusedByPolicy(RestoreFailed):
    """No image of a requeued job could be restored and the restore policy says fail."""


class NodeIncompatible(RestoreFailed):
    """This node cannot take the image (GPU model/count/memory, CRIU or driver too old)."""


class GpuError(SlurmMMError):
    """A CUDA driver checkpoint call failed or timed out."""

    exit_code = 7


class GpuTimeout(GpuError):
    """A CUDA driver call did not return within its watchdog limit."""


class CudaCallFailed(GpuError):
    """The driver answered a checkpoint call with an error (carries pid, call and CUresult)."""

    def __init__(self, op: str, pid: int, code: int, name: str) -> None:
        super().__init__(f"CUDA {op} of pid {pid} failed: {name} ({code})")
        self.op, self.pid, self.code, self.name = op, pid, code, name


class AgentUnavailable(SlurmMMError):
    """No node agent answers on that socket (wrong node, or the agent is down)."""

    exit_code = 12


class ProtocolError(SlurmMMError):
    """A peer of the agent's socket sent something that is not a well-formed message."""

    exit_code = 12


class LaunchFailed(SlurmMMError):
    """The job's tree could not be started (mm-init refused or died before its init ran)."""

    exit_code = 11


class NotEnrolled(SlurmMMError):
    """The job was not submitted with --checkpoint-interval."""

    exit_code = 8


class PermissionDenied(SlurmMMError):
    """The caller does not own the job or image it asked about."""

    exit_code = 9


class QuotaExceeded(CheckpointFailed):
    """The job's owner has used up their store quota (store_quota_per_user)."""


class SlurmError(SlurmMMError):
    """A Slurm command failed or returned something unreadable."""

    exit_code = 10


class JobGone(SlurmError):
    """Slurm answered and does not know the job (it ended and was purged, or never was)."""


def by_kind(kind: object, message: str) -> SlurmMMError:
    """The error a node agent reported as `kind` (a class name of this module) and text:
    error kinds cross the agent's socket as data, never guessed from the message."""
    cls = globals().get(str(kind))
    if cls is CudaCallFailed:
        cls = GpuError  # its fields do not cross the socket; its kind and text do
    if isinstance(cls, type) and issubclass(cls, SlurmMMError):
        return cls(message)
    return SlurmMMError(message)
