"""The agent's Prometheus textfile metrics and event log lines (no daemon needed)."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from types import SimpleNamespace

from slurm_mm.agent import job_comment
from slurm_mm.agent.metrics import METRICS, Metrics
from slurm_mm.errors import CheckpointFailed

LINE = re.compile(r'^([a-z_]+)(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? (-?[0-9.e+]+)$')


def image(trigger: str = "periodic") -> SimpleNamespace:
    files = [SimpleNamespace(size=1000, stored_size=400), SimpleNamespace(size=24, stored_size=24)]
    manifest = SimpleNamespace(files=files, uid=1001, trigger=trigger, created=time.time() - 5,
                               extra={"timings": {"dump": 0.25, "total": 0.3}})
    return SimpleNamespace(manifest=manifest, path=Path("/ckpt/7/ckpt-000003"))


def parse(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert line.split()[1] in ("HELP", "TYPE")
            continue
        m = LINE.match(line)
        assert m, f"not Prometheus text format: {line!r}"
        out[line.rsplit(" ", 1)[0]] = float(m.group(4))
    return out


def test_checkpoint_and_restore_events_become_series(tmp_path, caplog):
    m = Metrics(tmp_path, "n1")
    caplog.set_level(logging.INFO, logger="slurm_mm.agent")
    m.job_started("7", "launched")
    m.checkpoint_done("7", "periodic", time.monotonic() - 1.5, image())
    m.checkpoint_failed("7", "preempt", time.monotonic(), CheckpointFailed("criu dump failed"))
    m.restore_done("7", image("preempt"), time.monotonic() - 2)
    m.restore_done("7", image(), time.monotonic(), ValueError("bad"))
    values = parse((tmp_path / "slurm_mm_n1.prom").read_text())
    assert values['slurm_mm_checkpoints_total{node="n1",outcome="success",trigger="periodic"}'] == 1
    assert values['slurm_mm_checkpoints_total{node="n1",outcome="failure",trigger="preempt"}'] == 1
    assert values['slurm_mm_checkpoint_failures_total{node="n1",reason="CheckpointFailed",trigger="preempt"}'] == 1
    assert values['slurm_mm_checkpoint_duration_seconds_sum{node="n1",trigger="periodic"}'] >= 1.5
    assert values['slurm_mm_checkpoint_freeze_seconds_sum{node="n1",trigger="periodic"}'] == 0.25
    assert values['slurm_mm_checkpoint_bytes_total{kind="stored",node="n1"}'] == 424
    assert values['slurm_mm_checkpoint_bytes_total{kind="raw",node="n1"}'] == 1024
    assert values['slurm_mm_store_written_bytes_total{node="n1",uid="1001"}'] == 424
    assert values['slurm_mm_restores_total{node="n1",outcome="success"}'] == 1
    assert values['slurm_mm_restore_failures_total{node="n1",reason="ValueError"}'] == 1
    assert values['slurm_mm_restore_duration_seconds_count{node="n1"}'] == 1
    assert values['slurm_mm_jobs_started_total{mode="launched",node="n1"}'] == 1
    events = [r.getMessage() for r in caplog.records if r.getMessage().startswith("event=")]
    assert any(e.startswith("event=checkpoint job=7 trigger=periodic outcome=success") for e in events)
    assert any("outcome=failure reason=CheckpointFailed" in e and "trigger=preempt" in e for e in events)
    assert len(events) >= 2 and all(" job=7 " in e for e in events)


def test_every_series_written_is_documented():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "admin-guide.md").read_text()
    for name in METRICS:
        base = name.removesuffix("_sum").removesuffix("_count")
        assert base in doc, f"{name} is not documented in docs/admin-guide.md"


def test_no_directory_no_file_and_no_error(tmp_path):
    m = Metrics(tmp_path / "absent", "n1")
    m.checkpoint_done("7", "manual", time.monotonic(), image())
    assert not (tmp_path / "absent").exists()
    assert "slurm_mm_checkpoints_total" in m.text()


def test_label_values_are_escaped(tmp_path):
    m = Metrics(tmp_path, 'n"1')
    m.add("slurm_mm_restores_total", outcome='a"b\\c')
    assert 'node="n\\"1",outcome="a\\"b\\\\c"' in m.text()


def test_admin_comment_names_image_trigger_and_time():
    text = job_comment.text(image("drain"))
    assert re.fullmatch(r"slurm_mm last_image=ckpt-000003 trigger=drain taken=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ "
                        r"stored_bytes=424", text), text
