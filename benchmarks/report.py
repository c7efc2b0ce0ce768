"""Figures of a benchmark run: the machine they were measured on, the table printed for
people and the JSON written for scripts and plots."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raw import criu_version


@dataclass
class Figure:
    """One measured figure, with the raw-tool figure it is compared with (if any).

    ratio = value / baseline. goal is (op, limit) applied to the ratio, or to the value
    itself when there is no baseline: ("<=", 0.5), (">=", 0.9), ("<", 0.01).
    """

    bench: str
    name: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    goal: tuple[str, float] | None = None
    note: str = ""
    samples: list[float] = field(default_factory=list)
    baseline_samples: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or not self.baseline:
            return None
        return self.value / self.baseline

    @property
    def met(self) -> bool | None:
        if self.goal is None:
            return None
        op, limit = self.goal
        x = self.ratio if self.baseline is not None else self.value
        if x is None:
            return None
        return {"<=": x <= limit, ">=": x >= limit, "<": x < limit, ">": x > limit}[op]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["goal"] = None if self.goal is None else f"{self.goal[0]} {self.goal[1]:g}"
        d["ratio"] = self.ratio
        d["met"] = self.met
        return d


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    if unit == "%":
        return f"{x:.3g}%"
    if abs(x) >= 100:
        s = f"{x:.0f}"
    elif abs(x) >= 10:
        s = f"{x:.1f}"
    else:
        s = f"{x:.3g}"
    return f"{s} {unit}".strip()


def table(figures: list[Figure]) -> str:
    rows = [("bench", "figure", "slurm_mm", "raw tool", "ratio", "goal", "")]
    for f in figures:
        goal = "" if f.goal is None else f"{f.goal[0]} {f.goal[1]:g}" + ("x" if f.baseline is not None else "")
        verdict = {True: "met", False: "MISSED", None: ""}[f.met]
        base = "" if f.baseline is None else f"{_fmt(f.baseline, f.unit)} ({f.baseline_name})"
        rows.append((f.bench, f.name, _fmt(f.value, f.unit), base,
                     "" if f.ratio is None else f"{f.ratio:.2f}x", goal, verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = [f"  [{f.bench}] {f.name}: {f.note}" for f in figures if f.note]
    return "\n".join(lines + (["", "notes:"] + notes if notes else []))


def _cmd(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip()
    except OSError:
        return ""


def _fs(path: Path) -> str:
    """Filesystem type and device of the mount holding `path`."""
    out = _cmd(["df", "--output=source,fstype,size,avail", "-h", str(path)]).splitlines()
    return " ".join(out[-1].split()) if out else "?"


def machine(shared: Path, staging: Path) -> dict[str, Any]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    try:
        debian = Path("/etc/debian_version").read_text().strip()
    except OSError:
        debian = "not Debian"
    try:
        import zstandard
        zstd = zstandard.__version__
    except ImportError:
        zstd = "missing"
    return {
        "uname": _cmd(["uname", "-a"]) or " ".join(platform.uname()),
        "cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem_kib / 2**20, 1),
        "debian": debian, "criu": criu_version(), "python": platform.python_version(),
        "zstandard": zstd, "shared_dir": f"{shared} ({_fs(shared)})", "staging_dir": f"{staging} ({_fs(staging)})",
        "thp": _cmd(["cat", "/sys/kernel/mm/transparent_hugepage/enabled"]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def write_json(path: Path, *, machine_info: dict, config: dict, figures: list[Figure],
               details: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"machine": machine_info, "config": config, "figures": [f.to_dict() for f in figures],
            "details": details}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def markdown(figures: list[dict]) -> str:
    """The figures of one or more JSON results as a Markdown table (for docs/benchmarks.md)."""
    out = ["| bench | figure | slurm_mm | raw tool | ratio | goal | |", "|---|---|---|---|---|---|---|"]
    for f in figures:
        base = "" if f["baseline"] is None else f"{_fmt(f['baseline'], f['unit'])} ({f['baseline_name']})"
        ratio = "" if f["ratio"] is None else f"{f['ratio']:.2f}x"
        goal = (f["goal"] or "") + ("x" if f["goal"] and f["baseline"] is not None else "")
        verdict = {True: "met", False: "**missed**", None: ""}[f["met"]]
        out.append(f"| {f['bench']} | {f['name']} | {_fmt(f['value'], f['unit'])} | {base} | {ratio} | {goal} "
                   f"| {verdict} |")
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 2:
        print("usage: report.py RESULTS.json... (prints their figures as a Markdown table)", file=sys.stderr)
        sys.exit(2)
    figs: list[dict] = []
    for arg in sys.argv[1:]:
        figs += json.loads(Path(arg).read_text())["figures"]
    print(markdown(figs))
