"""The node agent: the small root daemon that does slurm_mm's privileged work on a node.

It launches enrolled batch jobs in their own PID namespace (or restores them from an
image), checkpoints them periodically and on preemption or drain, and requeues them.
It composes the engine (processes), the store (images) and the Slurm client; callers
are authenticated by SO_PEERCRED and /proc, never by what they send.
"""
