"""Which GPUs a node offers, what an image was taken on, and whether the two fit.

A checkpoint records the inventory of the GPUs its job used (model, UUIDs, memory,
driver and CUDA driver versions); before anything is restored, `check_compatible`
compares that record with this node and raises NodeIncompatible if the image cannot
come back here: another GPU model or count, too little free GPU memory, or an older
driver. Restoring GPU memory onto another chip type fails inside the driver, after the
CPU side is already restored, so this check must come first.

Reads NVML through pynvml (package nvidia-ml-py, imported lazily) and falls back to
`nvidia-smi` when pynvml is missing. Never touches a process; never talks to CUDA's
checkpoint API (that is gpu.py's job).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from slurm_mm.errors import ImageCorrupt, NodeIncompatible

MiB = 1 << 20
GiB = 1 << 30
NVIDIA_SMI_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Gpu:
    """One GPU as NVML sees it. `memory_free` is a reading, not part of the record."""

    index: int
    uuid: str
    name: str
    memory_total: int
    memory_free: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "uuid": self.uuid,
            "name": self.name,
            "memory_total": self.memory_total,
        }


@dataclass(frozen=True)
class GpuInventory:
    """The GPUs of a node (or of one job's allocation) and the driver that runs them."""

    driver_version: str
    cuda_driver_version: int  # as cuDriverGetVersion gives it: 13000 is CUDA 13.0
    gpus: tuple[Gpu, ...]

    @property
    def count(self) -> int:
        return len(self.gpus)

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(gpu.name for gpu in self.gpus)

    @property
    def uuids(self) -> tuple[str, ...]:
        return tuple(gpu.uuid for gpu in self.gpus)

    @property
    def memory_total(self) -> int:
        return sum(gpu.memory_total for gpu in self.gpus)

    def to_dict(self) -> dict[str, Any]:
        """The form recorded in an image's manifest."""
        return {
            "driver_version": self.driver_version,
            "cuda_driver_version": self.cuda_driver_version,
            "count": self.count,
            "gpus": [gpu.to_dict() for gpu in self.gpus],
        }

    @classmethod
    def from_dict(cls, data: Any) -> GpuInventory:
        """Read a recorded inventory; a malformed record is an ImageCorrupt naming the field."""
        if not isinstance(data, Mapping):
            raise ImageCorrupt(f"manifest gpu inventory must be a mapping, got {data!r}")
        try:
            driver = data["driver_version"]
            cuda = data["cuda_driver_version"]
            raw_gpus = data["gpus"]
        except KeyError as exc:
            raise ImageCorrupt(f"manifest gpu inventory lacks {exc.args[0]!r}") from None
        if not isinstance(driver, str) or not _version_tuple(driver):
            raise ImageCorrupt(f"manifest gpu inventory: bad driver_version {driver!r}")
        if isinstance(cuda, bool) or not isinstance(cuda, int) or cuda < 0:
            raise ImageCorrupt(f"manifest gpu inventory: bad cuda_driver_version {cuda!r}")
        if not isinstance(raw_gpus, list):
            raise ImageCorrupt(f"manifest gpu inventory: gpus must be a list, got {raw_gpus!r}")
        gpus = []
        for raw in raw_gpus:
            if not isinstance(raw, Mapping):
                raise ImageCorrupt(f"manifest gpu inventory: bad gpu entry {raw!r}")
            index, uuid, name, total = (raw.get(k) for k in ("index", "uuid", "name", "memory_total"))
            if (
                isinstance(index, bool) or not isinstance(index, int)
                or not isinstance(uuid, str) or not isinstance(name, str)
                or isinstance(total, bool) or not isinstance(total, int) or total < 0
            ):
                raise ImageCorrupt(f"manifest gpu inventory: bad gpu entry {dict(raw)!r}")
            gpus.append(Gpu(index=index, uuid=uuid, name=name, memory_total=total))
        count = data.get("count", len(gpus))
        if count != len(gpus):
            raise ImageCorrupt(f"manifest gpu inventory: count {count!r} but {len(gpus)} gpus listed")
        return cls(driver_version=driver, cuda_driver_version=cuda, gpus=tuple(gpus))


# ---------------------------------------------------------------------------- reading


def read_inventory(visible: str | Sequence[str | int] | None = None) -> GpuInventory | None:
    """This node's GPUs, or only the `visible` ones; None when there is no GPU or driver.

    `visible` is written like CUDA_VISIBLE_DEVICES (or Slurm's SLURM_JOB_GPUS): global
    indices or UUIDs (a unique prefix is enough), comma-separated or as a list.
    """
    inventory = _read_nvml()
    if inventory is _NO_NVML:
        inventory = _read_nvidia_smi()
    if inventory is None:
        return None
    return select_visible(inventory, visible)


def select_visible(inventory: GpuInventory, visible: str | Sequence[str | int] | None) -> GpuInventory:
    """The inventory restricted to `visible` (see read_inventory), in `visible`'s order."""
    if visible is None:
        return inventory
    items = visible.split(",") if isinstance(visible, str) else list(visible)
    chosen: list[Gpu] = []
    for item in items:
        key = str(item).strip()
        if not key:
            continue
        if key.isdigit():
            matches = [g for g in inventory.gpus if g.index == int(key)]
        else:
            matches = [g for g in inventory.gpus if g.uuid.startswith(key)]
        if len(matches) != 1:
            raise NodeIncompatible(f"visible GPU {key!r} matches {len(matches)} GPUs of this node")
        if matches[0] not in chosen:
            chosen.append(matches[0])
    return GpuInventory(inventory.driver_version, inventory.cuda_driver_version, tuple(chosen))


def process_gpu_memory() -> dict[int, int]:
    """GPU memory used per process (host PID -> bytes, summed over GPUs); {} if unknown."""
    try:
        pynvml = _import_pynvml()
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:
            return {}
        try:
            used: dict[int, int] = {}
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    used[proc.pid] = used.get(proc.pid, 0) + int(proc.usedGpuMemory or 0)
            return used
        except pynvml.NVMLError:
            return {}
        finally:
            _nvml_shutdown(pynvml)
    out = _nvidia_smi(["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"])
    return parse_compute_apps(out) if out is not None else {}


_NO_NVML = object()


def _import_pynvml():  # separate so tests can pretend pynvml is missing
    import pynvml  # noqa: PLC0415 - optional dependency, on GPU nodes only

    return pynvml


def _nvml_shutdown(pynvml) -> None:
    try:
        pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        pass


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _read_nvml():
    try:
        pynvml = _import_pynvml()
    except ImportError:
        return _NO_NVML
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None  # library present, no driver or no GPU
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        getter = getattr(pynvml, "nvmlSystemGetCudaDriverVersion_v2", None) or pynvml.nvmlSystemGetCudaDriverVersion
        cuda = int(getter())
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                Gpu(
                    index=i,
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    memory_total=int(memory.total),
                    memory_free=int(memory.free),
                )
            )
        return GpuInventory(driver, cuda, tuple(gpus))
    except pynvml.NVMLError:
        return None
    finally:
        _nvml_shutdown(pynvml)


def _nvidia_smi(args: list[str]) -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, *args], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _read_nvidia_smi() -> GpuInventory | None:
    gpus = _nvidia_smi(
        [
            "--query-gpu=index,uuid,name,memory.total,memory.free,driver_version",
            "--format=csv,noheader,nounits",
        ]
    )
    if gpus is None:
        return None
    details = _nvidia_smi(["-q"]) or ""
    return parse_nvidia_smi(gpus, details)


def parse_nvidia_smi(query_csv: str, details: str = "") -> GpuInventory | None:
    """Build an inventory from `nvidia-smi --query-gpu=...` CSV and `nvidia-smi -q` text."""
    gpus = []
    driver = ""
    for line in query_csv.splitlines():
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 6:
            raise NodeIncompatible(f"cannot read nvidia-smi line {line!r}")
        index, uuid, name, total, free, driver = fields
        gpus.append(
            Gpu(
                index=int(index),
                uuid=uuid,
                name=name,
                memory_total=int(float(total)) * MiB,
                memory_free=int(float(free)) * MiB if _is_number(free) else None,
            )
        )
    if not gpus:
        return None
    match = re.search(r"CUDA Version\s*:\s*(\d+)\.(\d+)", details)
    cuda = int(match.group(1)) * 1000 + int(match.group(2)) * 10 if match else 0
    return GpuInventory(driver_version=driver, cuda_driver_version=cuda, gpus=tuple(gpus))


def parse_compute_apps(text: str) -> dict[int, int]:
    """`nvidia-smi --query-compute-apps=pid,used_memory` CSV (MiB) -> {pid: bytes}."""
    used: dict[int, int] = {}
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0].isdigit() and _is_number(fields[1]):
            pid = int(fields[0])
            used[pid] = used.get(pid, 0) + int(float(fields[1])) * MiB
    return used


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------ comparing


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", version)
    return tuple(int(p) for p in parts)


def _cuda_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def _gib(nbytes: int) -> str:
    return f"{nbytes / GiB:.1f} GiB"


def check_compatible(
    recorded: GpuInventory | Mapping[str, Any] | None,
    needed_bytes: int | Sequence[int] = 0,
    current: GpuInventory | None = None,
) -> GpuInventory | None:
    """Refuse (NodeIncompatible) an image this node cannot restore; return this node's inventory.

    `recorded` is what the image was taken on (GpuInventory or its manifest dict);
    `needed_bytes` the GPU memory its processes will take back, in total or per GPU in
    the recorded order; `current` defaults to this node (read_inventory()), and should be
    the GPUs allocated to the new job. Rules: same number of GPUs, same model at each
    position, driver and CUDA driver versions not older than the recorded ones, enough
    free memory (in total, and per GPU when given per GPU). A record with no GPUs fits
    anywhere.
    """
    if recorded is not None and not isinstance(recorded, GpuInventory):
        recorded = GpuInventory.from_dict(recorded)
    if recorded is None or recorded.count == 0:
        return current
    if current is None:
        current = read_inventory()
    wanted = f"{recorded.count} x {recorded.models[0]}" if len(set(recorded.models)) == 1 else ", ".join(recorded.models)
    if current is None or current.count == 0:
        raise NodeIncompatible(f"image needs {wanted} GPU(s); this node has no usable GPU or driver")
    if current.count != recorded.count:
        raise NodeIncompatible(
            f"image was taken on {recorded.count} GPU(s) ({wanted}); this node offers {current.count}"
        )
    for old, new in zip(recorded.gpus, current.gpus):
        if old.name != new.name:
            raise NodeIncompatible(
                f"GPU model differs: image taken on {old.name!r}, this node's GPU {new.index} is {new.name!r}"
            )
    if _version_tuple(current.driver_version) < _version_tuple(recorded.driver_version):
        raise NodeIncompatible(
            f"NVIDIA driver {current.driver_version} is older than {recorded.driver_version}, "
            "the one the image was taken with"
        )
    if current.cuda_driver_version < recorded.cuda_driver_version:
        raise NodeIncompatible(
            f"CUDA driver {_cuda_text(current.cuda_driver_version)} is older than "
            f"{_cuda_text(recorded.cuda_driver_version)}, the one the image was taken with"
        )
    _check_memory(current.gpus, needed_bytes)
    return current


def _free(gpu: Gpu) -> int:
    return gpu.memory_total if gpu.memory_free is None else gpu.memory_free


def _check_memory(gpus: Iterable[Gpu], needed: int | Sequence[int]) -> None:
    gpus = tuple(gpus)
    if isinstance(needed, int):
        free = sum(_free(g) for g in gpus)
        if needed > free:
            raise NodeIncompatible(
                f"image needs {_gib(needed)} of GPU memory; this node's GPUs have {_gib(free)} free"
            )
        return
    needed = list(needed)
    if len(needed) != len(gpus):
        raise NodeIncompatible(f"image lists GPU memory for {len(needed)} GPUs; this node offers {len(gpus)}")
    for gpu, need in zip(gpus, needed):
        if need > _free(gpu):
            raise NodeIncompatible(
                f"GPU {gpu.index} ({gpu.uuid}) has {_gib(_free(gpu))} free; image needs {_gib(need)} on it"
            )


def uuid_hex(uuid: str) -> str:
    """'GPU-8c2f...-...' -> the 32 hex digits of the CUuuid the driver uses."""
    digits = uuid.removeprefix("GPU-").replace("-", "").lower()
    if not re.fullmatch(r"[0-9a-f]{32}", digits):
        raise NodeIncompatible(f"not a GPU UUID: {uuid!r}")
    return digits


def gpu_pairs(recorded: GpuInventory | Mapping[str, Any], current: GpuInventory) -> list[tuple[str, str]]:
    """(old, new) CUuuid hex pairs to remap a restore by position; [] when nothing moves.

    The driver wants every checkpointed GPU in the list once any pair is given, so it
    is all positions or none.
    """
    if not isinstance(recorded, GpuInventory):
        recorded = GpuInventory.from_dict(recorded)
    if recorded.count != current.count:
        raise NodeIncompatible(
            f"image was taken on {recorded.count} GPU(s); this node offers {current.count}"
        )
    pairs = [(uuid_hex(old.uuid), uuid_hex(new.uuid)) for old, new in zip(recorded.gpus, current.gpus)]
    if all(old == new for old, new in pairs):
        return []
    return pairs
