"""Real scientific applications (Debian packages, not ours) as ordinary batch scripts.

Each app is a `#!/bin/bash` script that runs in its job directory, runs the app as a
child (or through `srun`), post-processes its output, and appends one line to
`starts.txt` when it starts from the top: a resumed job never reads that line again.
`prepare()` writes the inputs (deterministic, from a fixed seed); `results()` reads
back what an uninterrupted run of the same script must reproduce exactly (the app's
output bytes, minus lines that carry a date, a path or a timing).

- md: GROMACS builds a water box, equilibrates it (`mdrun`, 2 OpenMP threads,
  `-reprod`, fixed seeds: bit-reproducible), checkpoints itself every ~6 s (writes
  md.cpt, renames the previous one to md_prev.cpt) and reports its final energies.
- assembly: velvet assembles reads of a synthetic genome: `velveth` then `velvetg`,
  each through `srun`; large intermediates (Sequences, Roadmaps, PreGraph, Graph2).
- lj: LAMMPS (an MPI-linked build run as a plain child: OpenMPI's singleton mode, which
  starts an `orted` helper process and listens on TCP) runs a Lennard-Jones melt of
  13500 atoms, dumping positions every 500 steps, then writes its final data file.
- align: `bwa index`, then `bwa mem -t 2 | samtools sort` (a pipe between two children
  of bash; samtools writes ~20 temporary BAMs and deletes them), then `samtools index`.
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

APT_PACKAGES = ("gromacs", "velvet", "bwa", "samtools", "lammps")
TOOLS = ("gmx", "velveth", "velvetg", "bwa", "samtools", "lmp")

_DATE = re.compile(r"^\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4}$")
_START = 'echo "start ${SLURM_JOB_ID:-reference} ${SLURMD_NODENAME:-local}" >> starts.txt\n'

SCRIPTS = {
    "md": "#!/bin/bash\n" + _START + """\
set -e
gmx -quiet solvate -cs spc216.gro -box 3 3 3 -o conf.gro -p topol.top
gmx -quiet grompp -f md.mdp -c conf.gro -p topol.top -o md.tpr
gmx -quiet mdrun -s md.tpr -deffnm md -nt 2 -ntmpi 1 -ntomp 2 -reprod -pin off -cpt 0.1
printf 'Potential\\nKinetic-En.\\nTotal-Energy\\nTemperature\\n' | gmx -quiet energy -f md.edr -o energy.xvg
grep -v '^[#@]' energy.xvg | tail -1 > final-energies.txt
echo "md done"
""",
    "assembly": "#!/bin/bash\n" + _START + """\
set -e
srun -n1 velveth asm 31 -fastq -short reads.fq > velveth.out
srun -n1 velvetg asm -cov_cutoff auto -exp_cov auto > velvetg.out
grep -c '>' asm/contigs.fa > contig-count.txt
echo "assembly done"
""",
    "lj": "#!/bin/bash\n" + _START + """\
set -e
lmp -in in.lj -log log.lammps > lmp.out
grep -B1 '^Loop time' log.lammps | head -1 > last-thermo.txt
echo "lj done"
""",
    "align": "#!/bin/bash\n" + _START + """\
set -e -o pipefail
bwa index ref.fa 2> index.log
mkdir -p sorttmp
bwa mem -t 2 -K 10000000 ref.fa reads.fq 2> mem.log | samtools sort -m 4M -T sorttmp/part -o aln.bam -
samtools index aln.bam
samtools idxstats aln.bam > idxstats.txt
echo "align done"
""",
}
# Not in the suite: the same alignment with bwa as an `srun` step whose output is a pipe
# into samtools (failed after a preemption while the batch tree was dumped before the
# step's tasks), and with the step writing its own file.
SCRIPTS["align-srun"] = SCRIPTS["align"].replace("bwa mem -t 2", "srun -n1 bwa mem -t 2")
# The step's task writes its output itself; samtools sorts the file after the step.
SCRIPTS["align-srunfile"] = SCRIPTS["align"].replace(
    "bwa mem -t 2 -K 10000000 ref.fa reads.fq 2> mem.log | samtools sort -m 4M -T sorttmp/part -o aln.bam -",
    "srun -n1 bash -c 'bwa mem -t 2 -K 10000000 ref.fa reads.fq > aln.sam 2> mem.log'\n"
    "samtools sort -m 4M -T sorttmp/part -o aln.bam aln.sam\nrm aln.sam")

# What an interrupted run must reproduce, byte for byte.
RESULT_FILES = {
    "md": ("md.gro", "md.xtc", "md.edr", "final-energies.txt"),
    "assembly": ("asm/contigs.fa", "asm/stats.txt", "asm/Sequences", "asm/LastGraph", "contig-count.txt"),
    "lj": ("final.data", "dump.lj", "last-thermo.txt"),
    "align": ("aln.bam", "aln.bam.bai", "idxstats.txt", "ref.fa.bwt", "ref.fa.sa"),
}

_MDP = """\
integrator    = md
dt            = 0.002
nsteps        = {steps}
nstlog        = 500
nstenergy     = 100
nstxout-compressed = 500
cutoff-scheme = Verlet
coulombtype   = PME
rcoulomb      = 0.9
rvdw          = 0.9
tcoupl        = v-rescale
tc-grps       = System
tau-t         = 0.1
ref-t         = 300
gen-vel       = yes
gen-temp      = 300
gen-seed      = 1234
ld-seed       = 1234
constraints   = h-bonds
"""

_LJ = """\
units lj
atom_style atomic
lattice fcc 0.8442
region box block 0 15 0 15 0 15
create_box 1 box
create_atoms 1 box
mass 1 1.0
velocity all create 3.0 87287 loop geom
pair_style lj/cut 2.5
pair_coeff 1 1 1.0 1.0 2.5
neighbor 0.3 bin
neigh_modify delay 0 every 20 check no
fix 1 all nve
thermo 100
dump 1 all custom 500 dump.lj id x y z vx vy vz
run {steps}
write_data final.data
"""

_TOP = """\
#include "oplsaa.ff/forcefield.itp"
#include "oplsaa.ff/spce.itp"

[ system ]
water box

[ molecules ]
"""


def _genome_and_reads(directory: Path, genome: int, coverage: int, seed: int) -> None:
    """A random genome and 100 bp reads from both strands with up to 2 substitutions each."""
    rng = random.Random(seed)
    seq = "".join(rng.choice("ACGT") for _ in range(genome))
    (directory / "ref.fa").write_text(">chr1\n" + "\n".join(seq[i:i + 80] for i in range(0, genome, 80)) + "\n")
    comp = str.maketrans("ACGT", "TGCA")
    length, qual = 100, "I" * 100
    with open(directory / "reads.fq", "w") as out:
        for i in range(genome * coverage // length):
            pos = rng.randrange(genome - length)
            read = list(seq[pos:pos + length])
            for _ in range(rng.randrange(3)):
                read[rng.randrange(length)] = rng.choice("ACGT")
            text = "".join(read)
            if rng.random() < 0.5:
                text = text.translate(comp)[::-1]
            out.write(f"@r{i}\n{text}\n+\n{qual}\n")


def prepare(app: str, directory: Path, scale: float = 1.0) -> str:
    """Write the app's inputs into `directory`; returns the batch script's text."""
    kind = app.split("-")[0]
    if kind == "md":
        (directory / "md.mdp").write_text(_MDP.format(steps=int(12000 * scale)))
        (directory / "topol.top").write_text(_TOP)
    elif kind == "assembly":
        _genome_and_reads(directory, int(1_000_000 * scale), 30, seed=7)
    elif kind == "lj":
        (directory / "in.lj").write_text(_LJ.format(steps=int(4000 * scale)))
    elif kind == "align":
        _genome_and_reads(directory, int(2_000_000 * scale), 40, seed=11)
    else:
        raise ValueError(f"unknown app {app!r}")
    return SCRIPTS[app]


def results(app: str, directory: Path) -> dict[str, str]:
    """sha256 of each result file (absent: 'missing'), plus velvet's Log without dates."""
    digest = {}
    for name in RESULT_FILES[app.split("-")[0]]:
        path = directory / name
        digest[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
    if app == "assembly" and (directory / "asm" / "Log").is_file():
        lines = (directory / "asm" / "Log").read_text().splitlines()
        digest["asm/Log (no dates)"] = "\n".join(l for l in lines if not _DATE.match(l))
    return digest


def listing(directory: Path) -> list[str]:
    """Every file and directory the job left, but its own output and start log."""
    skip = {"job.out", "starts.txt", "bin"}
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.relative_to(directory).parts[0] not in skip)


def fresh_starts(directory: Path) -> list[str]:
    path = directory / "starts.txt"
    return path.read_text().splitlines() if path.exists() else []
