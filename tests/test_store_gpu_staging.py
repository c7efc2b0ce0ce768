"""Where a GPU job's dump goes: tmpfs staging when the image fits there and in RAM beside
the job's GPU state (which the GPU checkpoint moves into its host memory), else the usual
staging. Real directories, real /proc/meminfo."""

from __future__ import annotations

import os

from store_fixtures import base, needs_root, owner  # noqa: F401  (fixtures)

from slurm_mm.agent import staging



def test_gpu_dump_goes_to_a_root_only_tmpfs_dir_when_it_fits(base):
    top = base / "shm"
    path = staging.gpu_dump_dir(top, "77", "dump-1", 1 << 20, 1 << 20, 0.1)
    assert path == top / "77" / "dump-1" and path.is_dir()
    assert oct(os.stat(top).st_mode & 0o777) == "0o700"


def test_gpu_dump_that_does_not_fit_in_memory_is_not_put_in_tmpfs(base):
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert staging.memory_allows(1 << 20, 0.01)
    assert not staging.memory_allows(total, 0.0)
    # the image alone would fit, but not beside the GPU state the job holds in host memory
    assert staging.gpu_dump_dir(base / "shm", "77", "dump-1", 1 << 20, total, 0.1) is None


@needs_root
def test_gpu_staging_made_by_someone_else_is_not_used(base, owner):
    top = base / "shm"
    top.mkdir(mode=0o700)
    os.chown(top, owner.pw_uid, owner.pw_gid)
    assert staging.gpu_dump_dir(top, "77", "dump-1", 1 << 20, 0, 0.1) is None
    os.chown(top, 0, 0)
    os.chmod(top, 0o755)
    assert staging.gpu_dump_dir(top, "77", "dump-1", 1 << 20, 0, 0.1) is None
    os.rmdir(top)
    os.symlink(base, top)
    assert staging.gpu_dump_dir(top, "77", "dump-1", 1 << 20, 0, 0.1) is None
    assert not (base / "77").exists()


def test_a_cpu_only_tree_holds_no_gpu_memory():
    assert staging.tree_gpu_bytes([os.getpid()]) == 0


def test_tree_without_processes_needs_nothing():
    assert staging.tree_resident_bytes([]) == 0 and staging.tree_gpu_bytes([]) == 0


def test_restore_of_a_gpu_image_is_staged_in_tmpfs_when_it_fits(base):
    top = base / "shm"
    path = staging.gpu_dump_dir(top, "77", "restore-3", 1 << 20, 1 << 20, 0.1, create=False)
    assert path == top / "77" / "restore-3" and not path.exists() and path.parent.is_dir()
