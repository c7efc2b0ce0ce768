"""Behaviours slurm_mm follows by Slurm version (pure logic, no Slurm needed)."""

from slurm_mm.slurm.version import major_minor, requeues_job_ending_in_grace


def test_slurm_from_24_05_requeues_a_job_that_ends_in_its_grace_time():
    assert requeues_job_ending_in_grace("slurm 24.11.5")
    assert requeues_job_ending_in_grace("slurm 24.05.0")
    assert requeues_job_ending_in_grace("slurm 25.11.1")


def test_older_slurm_needs_slurm_mm_to_requeue_a_preempted_job():
    assert not requeues_job_ending_in_grace("slurm-wlm 22.05.8")
    assert not requeues_job_ending_in_grace("slurm 23.11.10")
    assert not requeues_job_ending_in_grace("no version here")


def test_versions_are_read_from_slurm_and_pyslurm_spellings():
    assert major_minor("slurm-wlm 22.05.8") == (22, 5) == major_minor("22.5.0")
