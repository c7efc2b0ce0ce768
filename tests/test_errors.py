"""Error kinds: one hierarchy in slurm_mm.errors, carried by name across the agent socket."""

from __future__ import annotations

import pytest

from slurm_mm import errors


@pytest.mark.parametrize("kind", ["PermissionDenied", "NotEnrolled", "FileStateRefused", "RestoreFailed",
                                  "CheckpointFailed", "AgentUnavailable", "StaleEpoch"])
def test_agent_error_kind_comes_back_as_its_type(kind):
    exc = errors.by_kind(kind, "job 7 belongs to someone else")
    assert type(exc).__name__ == kind and str(exc) == "job 7 belongs to someone else"


@pytest.mark.parametrize("kind", [None, "", "ValueError", "os", "__builtins__", "by_kind", 3])
def test_unknown_or_foreign_kind_is_a_plain_error(kind):
    exc = errors.by_kind(kind, "text that says 'may not'")
    assert type(exc) is errors.SlurmMMError  # never inferred from the text


def test_restore_failure_is_not_a_checkpoint_failure():
    assert not issubclass(errors.RestoreFailed, errors.CheckpointFailed)
    assert errors.by_kind("CudaCallFailed", "x").__class__ is errors.GpuError
