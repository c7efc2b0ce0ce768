"""slurm_mm's configuration: one YAML file, validated on load.

The file is `/etc/slurm_mm/config.yaml`, or `$SLURM_MM_CONFIG` for tools run by admins
and tests. Root-run code reads it too, so it must be root-owned and not writable by
others; an unknown key, a wrong type or an impossible value is a one-line ConfigError
naming key and value.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slurm_mm import defaults as d
from slurm_mm.errors import ConfigError

DEFAULT_PATH = Path(d.CONFIG_PATH)


@dataclass(frozen=True)
class Timeouts:
    """Upper bounds (seconds) so that no step can hang a job or the node agent."""

    checkpoint: float = d.TIMEOUT_CHECKPOINT
    restore: float = d.TIMEOUT_RESTORE
    lock: float = d.TIMEOUT_LOCK


@dataclass(frozen=True)
class Config:
    checkpoint_root: Path = Path(d.CHECKPOINT_ROOT)
    staging_dir: Path = Path(d.STAGING_DIR)
    # GPU jobs dump here (tmpfs) when their image fits in it and in RAM, else to staging_dir.
    gpu_staging_dir: Path = Path(d.GPU_STAGING_DIR)
    run_dir: Path = Path(d.RUN_DIR)
    # %n = node name; must match agent_socket= in plugstack.conf.
    agent_socket: Path = Path(d.AGENT_SOCKET)
    criu_path: Path = Path(d.CRIU_PATH)
    libexec_dir: Path = Path(d.LIBEXEC_DIR)
    # Prometheus textfile collector directory; metrics are written only if it exists.
    metrics_dir: Path = Path(d.METRICS_DIR)
    keep_images: int = d.KEEP_IMAGES
    compression_level: int = d.COMPRESSION_LEVEL
    compression_threads: int = 0
    min_interval: int = d.MIN_INTERVAL
    async_checkpoints: bool = True
    staging_min_free_ratio: float = 0.1
    # CPU time per second that a periodic commit may take from the node, on top of its idle
    # priority (0 = no limit): even idle-priority work slows a job on the other vCPU of a VM.
    commit_background_cpus: float = 0.0
    # How a commit checks what it wrote: "cache" (buffered writes, read back through the
    # page cache), "device" (O_DIRECT writes and read-back from the storage: about half
    # the CPU per GB, but a second pass over the disk) or "auto" (device for periodic
    # commits, which share the node with jobs; cache for stopping ones, which race GraceTime).
    commit_read_back: str = d.COMMIT_READ_BACK
    # Where periodic commits run: "spare" (CPUs no job is bound to, else the idle ones) or
    # "any" (wherever the scheduler puts them). Stopping commits always run anywhere.
    commit_cpus: str = d.COMMIT_CPUS
    log_level: str = d.LOG_LEVEL
    # Jobs get their own mount namespace and /proc: needed for CUDA in a PID namespace
    # (docs/gpu-validation.md). auto = on nodes with GPU checkpointing.
    job_mount_namespace: str = "auto"
    # Directories whose files exist on one node only: files a job holds there travel in
    # its image. The job's own $TMPDIR and the directory of its batch script are added.
    node_local_paths: tuple[str, ...] = d.NODE_LOCAL_PATHS
    # Bytes of file copies (node-local files, files rewritten in place) one image may carry.
    file_state_budget: int = d.FILE_STATE_BUDGET
    # When no image of a requeued job can be restored: rerun the script, fail the job, or
    # hold it for its user (scontrol release).
    restore_policy: str = d.RESTORE_POLICY
    # Bytes of images one user may hold in the store (all their jobs); 0 = no limit.
    store_quota_per_user: int = d.STORE_QUOTA_PER_USER
    # Seconds between two sweeps that remove images of jobs that ended with no Epilog
    # (requeued, then cancelled while pending); 0 = never.
    store_sweep_interval: int = d.STORE_SWEEP_INTERVAL
    # When the store's filesystem has no POSIX ACLs: refuse, or group (user private groups).
    no_acl_fallback: str = d.NO_ACL_FALLBACK
    timeouts: Timeouts = field(default_factory=Timeouts)


_PATH_KEYS = {"checkpoint_root", "staging_dir", "gpu_staging_dir", "run_dir", "agent_socket", "criu_path",
              "libexec_dir", "metrics_dir"}
_LOG_LEVELS = {"debug", "info", "warning", "error"}
RESTORE_POLICIES = ("rerun", "fail", "hold")
NO_ACL_FALLBACKS = ("refuse", "group")


def config_path() -> Path:
    """Where the config lives: $SLURM_MM_CONFIG, else /etc/slurm_mm/config.yaml."""
    return Path(os.environ.get("SLURM_MM_CONFIG", DEFAULT_PATH))


def load(path: Path | None = None, *, require_safe_owner: bool = False) -> Config:
    """Load and validate a config file. A missing default file gives the defaults."""
    path = path or config_path()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        if path == DEFAULT_PATH:
            return Config()
        raise ConfigError(f"config file '{path}' does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot open config file '{path}': {exc.strerror}") from None
    with os.fdopen(fd, "r", encoding="utf-8") as handle:
        if require_safe_owner:
            _check_owner(path, os.fstat(handle.fileno()))
        try:
            data = yaml.safe_load(handle)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file '{path}'{where}: not valid YAML") from None
    return from_mapping(data or {}, source=str(path))


def _check_owner(path: Path, st: os.stat_result) -> None:
    if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"config file '{path}' must be owned by root and not group/other-writable"
        )


def from_mapping(data: Any, *, source: str = "config") -> Config:
    """Build a Config from parsed YAML, rejecting unknown keys and bad values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of key: value")
    values: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for key, raw in data.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown key '{key}'")
        if key == "timeouts":
            values[key] = _timeouts(raw, source)
        else:
            values[key] = _value(key, raw, fields[key].default, source)
    return Config(**values)


def _timeouts(raw: Any, source: str) -> Timeouts:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: 'timeouts' must be a mapping, got {raw!r}")
    names = {f.name for f in dataclasses.fields(Timeouts)}
    out = {}
    for key, value in raw.items():
        if key not in names:
            hint = " (removed: GPU driver calls are bounded by the GPU memory they move)" \
                if key == "gpu_call" else ""
            raise ConfigError(f"{source}: unknown key 'timeouts.{key}'{hint}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{source}: 'timeouts.{key}' must be a positive number, got {value!r}")
        out[key] = float(value)
    return Timeouts(**out)


def _value(key: str, raw: Any, default: Any, source: str) -> Any:
    if key in _PATH_KEYS:
        if not isinstance(raw, str) or not raw.startswith("/"):
            raise ConfigError(f"{source}: '{key}' must be an absolute path, got {raw!r}")
        if ".." in Path(raw).parts:
            raise ConfigError(f"{source}: '{key}' must not contain '..', got {raw!r}")
        return Path(raw)
    if isinstance(default, bool):
        if not isinstance(raw, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {raw!r}")
        return raw
    if isinstance(default, int):
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {raw!r}")
        _check_range(key, raw, source)
        return raw
    if isinstance(default, float):
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {raw!r}")
        if not 0.0 <= raw < 1.0:
            raise ConfigError(f"{source}: '{key}' must be in [0, 1), got {raw!r}")
        return float(raw)
    if key == "commit_read_back":
        if raw not in ("auto", "cache", "device"):
            raise ConfigError(f"{source}: 'commit_read_back' must be auto, cache or device, got {raw!r}")
        return raw
    if key == "commit_cpus":
        if raw not in ("spare", "any"):
            raise ConfigError(f"{source}: 'commit_cpus' must be spare or any, got {raw!r}")
        return raw
    if key == "job_mount_namespace":
        if raw not in ("auto", "always", "never"):
            raise ConfigError(f"{source}: 'job_mount_namespace' must be auto, always or never, got {raw!r}")
        return raw
    if key == "node_local_paths":
        if not isinstance(raw, list) or not all(isinstance(p, str) and p.startswith("/") and ".." not in p.split("/")
                                                for p in raw):
            raise ConfigError(f"{source}: 'node_local_paths' must be a list of absolute paths, got {raw!r}")
        return tuple(raw)
    if key == "restore_policy":
        if raw not in RESTORE_POLICIES:
            raise ConfigError(f"{source}: 'restore_policy' must be one of {', '.join(RESTORE_POLICIES)}, got {raw!r}")
        return raw
    if key == "no_acl_fallback":
        if raw not in NO_ACL_FALLBACKS:
            raise ConfigError(f"{source}: 'no_acl_fallback' must be one of {', '.join(NO_ACL_FALLBACKS)}, got {raw!r}")
        return raw
    if key == "log_level":
        if raw not in _LOG_LEVELS:
            raise ConfigError(f"{source}: 'log_level' must be one of {sorted(_LOG_LEVELS)}, got {raw!r}")
        return raw
    raise ConfigError(f"{source}: unsupported key '{key}'")  # pragma: no cover - guarded above


_RANGES = {
    "keep_images": (1, 1000),
    "compression_level": (1, 22),
    "compression_threads": (0, 256),
    "min_interval": (1, 365 * 86400),
    "file_state_budget": (0, 1 << 50),
    "store_quota_per_user": (0, 1 << 60),
    "store_sweep_interval": (0, 7 * 86400),
}


def _check_range(key: str, value: int, source: str) -> None:
    low, high = _RANGES[key]
    if not low <= value <= high:
        raise ConfigError(f"{source}: '{key}' must be between {low} and {high}, got {value}")


def log_level(config: Config) -> int:
    """The `logging` level for `log_level` (the agent, prolog and epilog honour it)."""
    return {"debug": 10, "info": 20, "warning": 30, "error": 40}[config.log_level]


def agent_socket(config: Config, node: str) -> Path:
    """The node agent's socket on `node` (test clusters run one agent per node name)."""
    return Path(str(config.agent_socket).replace("%n", node))


def dump(config: Config) -> str:
    """YAML text for a Config (the test cluster writes its own file with this)."""
    data = dataclasses.asdict(config)
    for key in _PATH_KEYS:
        data[key] = str(data[key])
    data["node_local_paths"] = list(config.node_local_paths)
    return yaml.safe_dump(data, sort_keys=False)
