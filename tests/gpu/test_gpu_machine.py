"""The GPU machine's checks (validate_gpu.py) as pytest tests, marked `gpu`.

Collected everywhere so that CI shows them skipped, with the reason, where there is no
NVIDIA GPU with the CUDA checkpoint API; on the GPU machine run
`python3 -m pytest --noconftest tests/gpu` (the suite's conftest wants the Slurm cluster).
"""

from validate_gpu import *  # noqa: F401,F403 - the fixture, the tests and pytestmark
