"""Plots for docs/benchmarks.md from the JSON of run_benchmarks.py (and gpu_bench.py).

    /opt/slurm_mm/venv/bin/python benchmarks/plots.py RESULTS.json [--gpu GPU.json] [--out docs/img]

Writes freeze_vs_size.png (what the app feels of a checkpoint, by image size: slurm_mm's
async checkpoint, the serial baseline, a bare criu dump), throughput_vs_size.png (store
commit vs dd on the same filesystem) and, with --gpu, gpu_freeze.png (what a GPU job is
blocked for, per variant, split into GPU checkpoint, dump and GPU restore); with --store
(store_bench.py JSON) store_vs_raw.png (commit vs dd, verify and extract vs cold cat, and
CPU seconds per GB stored), with --targets (gpu_targets.py JSON) gpu_targets.png (freeze,
durable and restore of one GPU job by stage, against the goals and the raw tools' floors).
With --job (store_bench.py --pin JSON) job_slowdown.png (a CPU-bound job's slowdown
during each kind of commit). The RESULTS files may be left out when only --store/--targets/--job are given. Needs matplotlib, which
slurm_mm itself does not: /opt/slurm_mm/venv/bin/pip install matplotlib
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def freeze_plot(plt, data: dict, out: Path) -> Path:
    d = data.get("details", {})
    fig, ax = plt.subplots(figsize=(7, 4.2))
    scaling = sorted(d.get("scaling_size", []), key=lambda r: r["mib"])
    if scaling:
        gb = [r["image_bytes"] / 1e9 for r in scaling]
        ax.plot(gb, [r["felt_s"] for r in scaling], "o-", label="slurm_mm async: freeze the app felt")
        ax.plot(gb, [r["raw_dump_s"] for r in scaling], "s--", label="bare criu dump -R (to staging)")
        ax.plot(gb, [r["felt_s"] + r["commit_s"] for r in scaling], "^:",
                label="async: dump + background commit (until the image is safe)")
    freeze = sorted(d.get("freeze", []), key=lambda r: r["mib"])
    if freeze:
        gb = [_med([x["image_bytes"] for x in r["serial"]]) / 1e9 for r in freeze]
        ax.plot(gb, [_med([x["felt_s"] for x in r["serial"]]) for r in freeze], "D", ms=8, color="C3",
                label="serial baseline, felt (freeze bench)")
        ax.plot(gb, [_med([x["felt_s"] for x in r["async"]]) for r in freeze], "o", ms=8, mfc="none", color="C0",
                label="async, felt (freeze bench)")
    ax.set_xlabel("image size (GB)")
    ax.set_ylabel("seconds")
    ax.set_title("What the job feels of one checkpoint")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "freeze_vs_size.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def gpu_plot(plt, gpu: dict, out: Path) -> Path:
    """Freeze the GPU job felt, per variant and size, split into GPU checkpoint, CRIU dump,
    GPU restore and the rest (fsync or commit inside the freeze)."""
    steps = [s for s in gpu.get("steps", []) if s.get("step") in ("async", "serial", "serial_sync", "serial_commit")]
    sizes = sorted({s["size_gb"] for s in steps})
    variants = [("async", "slurm_mm async"), ("serial", "serial"), ("serial_sync", "serial + fsync"),
                ("serial_commit", "serial + commit")]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    labels, x = [], 0
    seen = set()
    for size in sizes:
        for key, name in variants:
            row = next((s for s in steps if s["size_gb"] == size and s["step"] == key), None)
            if row is None:
                continue
            t = row.get("timings") or {}
            gs, dump, gr = t.get("gpu_suspend", 0.0), t.get("dump", row.get("dump_s") or 0.0), t.get("gpu_resume", 0.0)
            rest = max(0.0, row["felt_s"] - gs - dump - gr)
            bottom = 0.0
            for part, value, color in (("GPU checkpoint", gs, "C4"), ("CRIU dump", dump, "C0"),
                                       ("GPU restore", gr, "C2"), ("other (fsync, commit, GPU steps)", rest, "C7")):
                ax.bar(x, value, bottom=bottom, color=color, label=part if part not in seen else None)
                seen.add(part)
                bottom += value
            labels.append(f"{size:g} GB\n{name}")
            x += 1
        x += 0.5
    ax.set_xticks(_positions(sizes, steps, variants), labels,
                  fontsize=7)
    ax.set_ylabel("seconds the job was blocked")
    ax.set_title("GPU job: what one checkpoint blocks (H100, app-measured)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "gpu_freeze.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _positions(sizes, steps, variants) -> list[float]:
    pos, x = [], 0.0
    for size in sizes:
        for key, _ in variants:
            if any(s["size_gb"] == size and s["step"] == key for s in steps):
                pos.append(x)
                x += 1
        x += 0.5
    return pos


def throughput_plot(plt, data: dict, out: Path) -> Path:
    d = data.get("details", {})
    fig, ax = plt.subplots(figsize=(7, 4.2))
    rows = d.get("store", [])
    for content, style in (("criu-image", "-"), ("incompressible", "--")):
        rs = sorted((r for r in rows if r["content"] == content), key=lambda r: r["bytes"])
        if not rs:
            continue
        gb = [r["bytes"] / 1e9 for r in rs]
        ax.plot(gb, [r["bytes"] / _med(r["dd_write_s"]) / 1e6 for r in rs], "s" + style, color="C3",
                label=f"dd conv=fsync, {content}")
        for lv, color in (("1", "C1"), ("3", "C0")):
            if all(lv in r["commit_s"] for r in rs):
                ax.plot(gb, [r["bytes"] / _med(r["commit_s"][lv]) / 1e6 for r in rs], "o" + style, color=color,
                        label=f"store commit zstd {lv}, {content}")
    scaling = sorted(d.get("scaling_size", []), key=lambda r: r["mib"])
    if scaling:
        ax.plot([r["image_bytes"] / 1e9 for r in scaling],
                [r["image_bytes"] / r["commit_s"] / 1e6 for r in scaling], "^-", color="C2",
                label="background commit of a job's image (scaling bench)")
    ax.set_xlabel("bytes written (GB)")
    ax.set_ylabel("MB/s (raw bytes)")
    ax.set_title("Store commit vs a raw sequential write, same filesystem")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "throughput_vs_size.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def store_plot(plt, files: list[Path], out: Path) -> Path:
    """Per content and read-back mode: ratios to the raw tool (left), CPU-s/GB (right)."""
    rows = [r for f in files for r in json.loads(f.read_text()).get("rows", [])]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["content"], r["read_back"]), []).append(r)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels, commit, verify, extract, cpu_c, cpu_v = [], [], [], [], [], []
    # Verify and extract do not depend on the commit's read-back mode: the rows of the
    # other mode of the same content (measured in the same run) stand in for them.
    by_content = {c: [r for r in rows if r["content"] == c and "verify_cpu_per_gb" in r] for c, _ in groups}
    for (content, mode), rs in sorted(groups.items()):
        rs = rs if any("verify_cpu_per_gb" in r for r in rs) else rs + [
            {k: v for k, v in r.items() if k.startswith(("verify", "extract"))} for r in by_content[content]]
        labels.append(f"{content}\nread_back={mode}")
        commit.append(_med([r.get("commit_vs_dd") for r in rs]))
        verify.append(_med([r.get("verify_vs_cat") for r in rs]))
        extract.append(_med([r.get("extract_vs_cat") for r in rs]))
        cpu_c.append(_med([r.get("commit_cpu_per_gb") for r in rs]))
        cpu_v.append(_med([r.get("verify_cpu_per_gb") for r in rs]))
    x = range(len(labels))
    for i, (name, vals) in enumerate((("commit / dd conv=fsync", commit), ("verify / cold cat", verify),
                                      ("extract / cold cat", extract))):
        ax.bar([k + (i - 1) * 0.27 for k in x], [v or 0 for v in vals], 0.27, label=name)
    ax.axhline(0.9, color="k", ls="--", lw=0.8)
    ax.axhline(0.8, color="grey", ls=":", lw=0.8)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("speed relative to the raw tool (higher is better)")
    ax.set_title("store vs raw tools, same run (goals: 0.9 commit, 0.8 read)", fontsize=9)
    ax.legend(fontsize=7)
    bx.bar(list(x), [v or 0 for v in cpu_c], 0.5, label="commit")
    bx.bar(list(x), [v or 0 for v in cpu_v], 0.5, bottom=[v or 0 for v in cpu_c], label="verify (cold)")
    bx.axhline(1.0, color="k", ls="--", lw=0.8)
    bx.set_xticks(list(x), labels, fontsize=8)
    bx.set_ylabel("CPU seconds per GB stored")
    bx.set_title("commit + verify CPU (goal <= 1)", fontsize=9)
    bx.legend(fontsize=7)
    fig.tight_layout()
    path = out / "store_vs_raw.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def targets_plot(plt, files: list[Path], out: Path) -> Path:
    """One GPU job through the store: freeze, durable and restore, stacked by stage."""
    rounds = [r for f in files for r in json.loads(f.read_text()).get("rounds", [])]
    fig, ax = plt.subplots(figsize=(10, 0.9 + 1.3 * len(rounds)))
    colors = {"GPU checkpoint": "#1f77b4", "CRIU dump": "#ff7f0e", "GPU resume": "#2ca02c", "commit": "#9467bd",
              "extract": "#8c564b", "CRIU restore": "#e377c2", "GPU restore": "#7f7f7f",
              "until the app iterates": "#bcbd22"}
    seen = set()
    ticks, labels = [], []
    for i, r in enumerate(rounds):
        ck, rs = r["checkpoint_timings"], r.get("restore_timings", {})
        thp = r["thp"][r["thp"].index("[") + 1:r["thp"].index("]")]
        y0 = i * 3
        bars = [(y0 + 1, "durable", [("GPU checkpoint", ck["gpu_suspend"]), ("CRIU dump", ck["dump"]),
                                     ("GPU resume", ck["gpu_resume"]), ("commit", r["commit_s"])], 20),
                (y0, "restore", [("extract", r.get("extract_s", 0)), ("CRIU restore", rs.get("restore", 0)),
                                 ("GPU restore", rs.get("gpu_resume", 0)),
                                 ("until the app iterates", r.get("until_iterating_s", r.get("restore_s", 0)
                                  - r.get("extract_s", 0) - r.get("restore_tree_s", 0)))], 12)]
        for y, name, parts, goal in bars:
            left = 0.0
            for stage, v in parts:
                ax.barh(y, v, left=left, color=colors[stage], label=None if stage in seen else stage)
                seen.add(stage)
                left += v
            ax.plot([goal, goal], [y - 0.4, y + 0.4], color="k", lw=1.5)
            ticks.append(y)
            labels.append(f"{name}, THP {thp}, read_back {r['read_back']}" + (", libs warm" if r.get("warm_libs") else ""))
        ax.plot([10, 10], [y0 + 0.6, y0 + 1.4], color="r", lw=1.5)
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.set_xlabel("seconds (black: goal of the bar; red: freeze goal, 10 s)")
    ax.set_title("A 13 GB GPU job through the store (freeze = GPU checkpoint + dump + GPU resume)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = out / "gpu_targets.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def job_plot(plt, files: list[Path], out: Path) -> Path:
    """A CPU-bound job's slowdown during each kind of commit (store_bench.py --pin): mean
    and 95% interval per run, against the 5% goal."""
    runs = [(f.stem, row) for f in files for row in json.loads(f.read_text()).get("job", []) if "kinds" in row]
    kinds = list(dict.fromkeys(k for _, row in runs for k in row["kinds"]))
    fig, ax = plt.subplots(figsize=(9, 0.8 + 0.45 * len(kinds) * len(runs)))
    y, ticks, labels = 0, [], []
    for kind in kinds:
        for name, row in runs:
            d = row["kinds"].get(kind)
            if d is None:
                continue
            sd = d["slowdown"]
            lo, hi = sd["ci95"]
            ax.barh(y, sd["mean"] * 100, color="#1f77b4" if kind in ("spare", "hand") else "#aaaaaa")
            ax.plot([lo * 100, hi * 100], [y, y], color="k", lw=1.5)
            ticks.append(y)
            labels.append(f"{kind} ({name}, {row.get('read_back', '')}, n={sd['n']}, commit {d['commit_s']['mean']:.1f} s)")
            y += 1
        y += 0.5
    ax.axvline(5, color="r", lw=1.2)
    ax.axvline(0, color="k", lw=0.6)
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("job slowed during the commit, % (mean, 95% interval); red: goal 5%")
    ax.set_title("CPU-bound job bound to CPU 0 beside a 1 GiB commit, 2-vCPU VM", fontsize=9)
    fig.tight_layout()
    path = out / "job_slowdown.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, nargs="*", help="run_benchmarks.py JSON file(s), merged in order")
    p.add_argument("--store", type=Path, nargs="+", default=[], help="store_bench.py JSON file(s)")
    p.add_argument("--targets", type=Path, nargs="+", default=[], help="gpu_targets.py JSON file(s)")
    p.add_argument("--gpu", type=Path, default=None, help="gpu_bench.py JSON")
    p.add_argument("--job", type=Path, nargs="+", default=[], help="store_bench.py --pin JSON file(s)")
    p.add_argument("--out", type=Path, default=HERE.parent / "docs" / "img")
    args = p.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots need matplotlib: /opt/slurm_mm/venv/bin/pip install matplotlib", file=sys.stderr)
        return 2
    data: dict = {"details": {}}
    for path in args.results:
        data["details"].update(json.loads(path.read_text()).get("details", {}))
    gpu = json.loads(args.gpu.read_text()) if args.gpu else None
    args.out.mkdir(parents=True, exist_ok=True)
    paths = [freeze_plot(plt, data, args.out), throughput_plot(plt, data, args.out)] if args.results else []
    if args.store:
        paths.append(store_plot(plt, args.store, args.out))
    if args.targets:
        paths.append(targets_plot(plt, args.targets, args.out))
    if args.job:
        paths.append(job_plot(plt, args.job, args.out))
    if gpu:
        paths.append(gpu_plot(plt, gpu, args.out))
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
