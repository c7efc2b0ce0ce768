"""Prolog and epilog on a real store, without Slurm: what the prolog prepares and names,
and what the epilog removes (the images of a job that ended for good) or keeps (a
requeued job's)."""

from __future__ import annotations

import logging
import os

import pytest
from store_fixtures import base, commit, needs_root, owner, source  # noqa: F401

from slurm_mm import hooks

pytestmark = needs_root


@pytest.fixture
def site(base, monkeypatch):  # noqa: F811
    cfg = base / "config.yaml"
    cfg.write_text(f"checkpoint_root: {base / 'ckpt'}\nrun_dir: {base / 'run'}\n"
                   f"staging_dir: {base / 'staging'}\ngpu_staging_dir: {base / 'gpu'}\nkeep_images: 2\n")
    os.chmod(cfg, 0o644)
    monkeypatch.setenv("SLURM_MM_CONFIG", str(cfg))
    return base


def _env(job: str, user, restart: int = 0, **more: str) -> dict[str, str]:
    return {"SLURM_JOB_ID": job, "SLURM_JOB_UID": str(user.pw_uid), "SLURM_JOB_GID": str(user.pw_gid),
            "SLURM_JOB_RESTART_COUNT": str(restart), "SPANK_SLURM_MM_INTERVAL": "600",
            "SLURMD_NODENAME": "n1", **more}


def _store(site):
    from slurm_mm import config  # noqa: PLC0415
    from slurm_mm.checkpointer import open_store  # noqa: PLC0415

    return open_store(config.load())


def test_an_unenrolled_job_is_untouched(site, owner, monkeypatch):  # noqa: F811
    env = _env("41", owner)
    env["SPANK_SLURM_MM_INTERVAL"] = "0"
    monkeypatch.setattr(os, "environ", env)
    assert hooks.prolog_main() == 0
    assert not (site / "ckpt" / "41").exists()


def test_prolog_prepares_the_job_directory_and_names_the_image_to_restore(site, owner, caplog):  # noqa: F811
    store = _store(site)
    hooks.prolog(_env("42", owner))
    assert (site / "ckpt" / "42").is_dir()
    src = source(site, {"pages-1.img": b"x" * 100})
    commit(store, "42", src, epoch=0, uid=owner.pw_uid, gid=owner.pw_gid)
    # An image of run 1 itself (a run never restores its own or a later run's image).
    commit(store, "42", source(site, {"pages-1.img": b"y"}), epoch=1, uid=owner.pw_uid, gid=owner.pw_gid)
    with caplog.at_level(logging.WARNING, logger="slurm_mm.hooks"):
        hooks.prolog(_env("42", owner, restart=1))
    assert "job 42 run 1: will restore ckpt-000001 (trigger periodic, epoch 0)" in caplog.text


def test_epilog_keeps_a_requeued_jobs_images_and_removes_them_when_it_ended_for_good(site, owner):  # noqa: F811
    from slurm_mm import config  # noqa: PLC0415
    from slurm_mm.agent import enrollment  # noqa: PLC0415

    store = _store(site)
    hooks.prolog(_env("43", owner))
    assert enrollment.recorded_run(config.load(), "43", "n1") == 0
    for n in range(3):
        commit(store, "43", source(site, {"pages-1.img": bytes([n]) * 10}), epoch=0,
               uid=owner.pw_uid, gid=owner.pw_gid)
    (site / "staging" / "43").mkdir(parents=True)
    # A requeue: slurmd already gives the epilog the next run's restart count.
    hooks.epilog(_env("43", owner, restart=1, SLURM_JOB_EXIT_CODE="0"))
    assert [i.path.name for i in store.images("43")] == ["ckpt-000003", "ckpt-000002"], "kept, trimmed"
    assert not (site / "staging" / "43").exists()
    assert enrollment.recorded_run(config.load(), "43", "n1") is None, "the run's markers went"
    # Run 1 fails for good: same restart count as its prolog saw.
    hooks.prolog(_env("43", owner, restart=1))
    hooks.epilog(_env("43", owner, restart=1, SLURM_JOB_EXIT_CODE="256"))
    assert not (site / "ckpt" / "43").exists()


def test_epilog_without_a_prolog_record_removes_only_a_completed_jobs_images(site, owner):  # noqa: F811
    from slurm_mm import config  # noqa: PLC0415

    store = _store(site)
    store.prepare_job("44", owner.pw_uid, owner.pw_gid)
    commit(store, "44", source(site, {"pages-1.img": b"z" * 10}), epoch=0, uid=owner.pw_uid, gid=owner.pw_gid)
    hooks.epilog(_env("44", owner))
    assert [i.path.name for i in store.images("44")] == ["ckpt-000001"], "no record here: kept"
    marker = hooks.completion_marker(config.load(), "44")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("0\n")
    hooks.epilog(_env("44", owner))
    assert not (site / "ckpt" / "44").exists() and not marker.exists()


def test_epilog_keeps_the_images_of_a_run_the_agent_requeued_whatever_the_counts(site, owner):  # noqa: F811
    from slurm_mm import config  # noqa: PLC0415
    from slurm_mm.agent import enrollment  # noqa: PLC0415

    store = _store(site)
    hooks.prolog(_env("45", owner))
    commit(store, "45", source(site, {"pages-1.img": b"q" * 10}), epoch=0, uid=owner.pw_uid, gid=owner.pw_gid)
    enrollment.mark_requeued(config.load(), "45", "n1", 0)
    hooks.epilog(_env("45", owner))  # restart count not (yet) raised
    assert [i.path.name for i in store.images("45")] == ["ckpt-000001"]
    assert not enrollment.requeued_by_agent(config.load(), "45", "n1")
