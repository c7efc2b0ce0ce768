"""`python -m slurm_mm.cli` runs the slurm-mm command."""
import sys

from slurm_mm.cli import main

sys.exit(main())
