"""The checkpoint engine: launch a job's tree in its own PID namespace, checkpoint it
(GPU state, then CRIU) and restore it. Knows processes, CRIU and the CUDA API; never
Slurm, never the image store's layout (it is handed directories).

    tree = launch(argv, uid=U, gid=G, stdout=fd, stderr=fd, cwd=dir)
    result = checkpoint_tree(tree.init_pid, images_dir, leave_running=False, gpu=gpu)
    restored = restore_tree(images_dir, stdout=new_fd, stderr=new_fd, owner_uid=U, gpu=gpu)
    code = restored.wait()
"""

from slurm_mm.engine.checkpoint import CheckpointResult, GpuCheckpointing, checkpoint_tree
from slurm_mm.engine.criu import Criu
from slurm_mm.engine.launcher import LaunchedTree, LaunchFailed, launch
from slurm_mm.engine.proctree import wait_gone
from slurm_mm.engine.restore import RestoredTree, read_metadata, restore_tree

__all__ = [
    "CheckpointResult",
    "Criu",
    "GpuCheckpointing",
    "LaunchFailed",
    "LaunchedTree",
    "RestoredTree",
    "checkpoint_tree",
    "launch",
    "read_metadata",
    "restore_tree",
    "wait_gone",
]
