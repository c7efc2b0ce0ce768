"""Where a commit's work runs and how it reads back: periodic commits stay off the CPUs
the node's jobs are bound to and use the CPU-cheap direct I/O; stopping commits
(preemption, drain) run anywhere, at normal priority, on the faster buffered path.
Real threads, real affinity and scheduling policy, a real store on disk.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

from store_fixtures import base, commit, source  # noqa: F401  (fixtures)

from slurm_mm.agent import commit_cpus
from slurm_mm.store import ImageStore, chunks, pipeline
from slurm_mm.store.priority import Priority

CHUNK = 64 << 10
ALL = frozenset(os.sched_getaffinity(0))  # two or more: the test machines and CI have 2 CPUs


def _spy_encoders(monkeypatch) -> list[tuple[frozenset[int], int]]:
    """(affinity, scheduling policy) of the thread of every chunk encoded."""
    seen: list[tuple[frozenset[int], int]] = []
    real = chunks.Encoder.encode

    def spy(self, data, **kw):
        seen.append((frozenset(os.sched_getaffinity(0)), os.sched_getscheduler(0)))
        return real(self, data, **kw)

    monkeypatch.setattr(chunks.Encoder, "encode", spy)
    return seen


def test_a_periodic_commit_runs_on_the_cpus_it_is_given_and_a_preempt_commit_anywhere(base, monkeypatch):
    store = ImageStore(base / "ckpt", threads=4, chunk_size=CHUNK)
    seen = _spy_encoders(monkeypatch)
    one = frozenset({max(ALL)})
    data = os.urandom(8 * CHUNK)
    image = commit(store, "7", source(base, {"pages-1.img": data}), trigger="periodic", cpus=one)
    assert seen and all(cpus == one and policy == os.SCHED_IDLE for cpus, policy in seen)
    seen.clear()
    commit(store, "7", source(base, {"pages-1.img": data}), trigger="preempt", cpus=one)
    assert seen and all(cpus == ALL and policy == os.SCHED_OTHER for cpus, policy in seen)
    store.extract(image, base / "out")
    assert (base / "out" / "pages-1.img").read_bytes() == data
    assert os.sched_getaffinity(0) == ALL  # the caller's thread is never moved


def test_hurry_frees_a_placed_commit_and_lifts_its_one_thread_per_cpu_limit():
    priority = Priority(background=True, cpus=frozenset({max(ALL)}))
    inside = threading.Semaphore(0)
    release = threading.Event()
    states: list[tuple[frozenset[int], frozenset[int]]] = []

    def worker() -> None:
        priority.enter()
        before = frozenset(os.sched_getaffinity(0))
        with priority.slot():
            inside.release()
            release.wait(5)
        priority.check(True)
        states.append((before, frozenset(os.sched_getaffinity(0))))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    assert inside.acquire(timeout=5)
    assert not inside.acquire(timeout=0.3)  # one CPU given: one encoding thread at a time
    priority.hurry()
    assert inside.acquire(timeout=5)  # hurried: the second one gets in at once
    release.set()
    for t in threads:
        t.join(5)
    assert states == [(frozenset({max(ALL)}), ALL)] * 2


def test_auto_read_back_is_direct_for_periodic_commits_and_buffered_for_stopping_ones(base, monkeypatch):
    store = ImageStore(base / "ckpt", threads=2, chunk_size=CHUNK)
    assert store.read_back == "auto"
    modes: list[str] = []
    real = pipeline.write_files

    def spy(*args, **kw):
        modes.append(kw["read_back"])
        return real(*args, **kw)

    monkeypatch.setattr(pipeline, "write_files", spy)
    for trigger in ("periodic", "preempt", "drain", "manual"):
        commit(store, "7", source(base, {"pages-1.img": os.urandom(3 * CHUNK)}), trigger=trigger)
    assert modes == ["device", "cache", "cache", "cache"]


def _bound_child(cpus: set[int]):
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()

    def run() -> None:
        os.sched_setaffinity(0, cpus)
        stop.wait(30)

    child = ctx.Process(target=run)
    child.start()
    deadline = time.monotonic() + 5
    while os.sched_getaffinity(child.pid) != cpus and time.monotonic() < deadline:
        time.sleep(0.01)
    return child, stop


def test_spare_cpus_are_those_no_job_is_bound_to():
    job_cpu = min(ALL)
    child, stop = _bound_child({job_cpu})
    try:
        assert commit_cpus.spare_cpus([child.pid]) == ALL - {job_cpu}
        assert commit_cpus.spare_cpus([child.pid, 2 ** 22 + 7]) == ALL - {job_cpu}  # a gone pid is skipped
    finally:
        stop.set()
        child.join()


def test_with_every_cpu_bound_the_idle_or_least_busy_ones_are_taken():
    child, stop = _bound_child(set(ALL))
    try:
        picked = commit_cpus.spare_cpus([child.pid], sample_seconds=0.05)
        assert picked and picked <= ALL
    finally:
        stop.set()
        child.join()
