"""Finding: on a filesystem without POSIX ACLs the store fell back to images readable by
the job's primary group (0750/0640), so users sharing a group read each other's memory.
Now the agent and `slurm-mm config check` refuse such a store with one line unless the
site sets `no_acl_fallback: group` (every user has a private primary group). The store
here is a real ramfs mount (it refuses ACLs), in a private mount namespace."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import testcluster as tc

pytestmark = pytest.mark.cluster


def _config(cluster, tmp_path: Path, store: Path, fallback: str | None) -> Path:
    lines = [l for l in cluster.mm_config.read_text().splitlines()
             if not l.startswith(("checkpoint_root:", "no_acl_fallback:"))]
    lines.append(f"checkpoint_root: {store}")
    if fallback:
        lines.append(f"no_acl_fallback: {fallback}")
    cfg = tmp_path / f"slurm_mm-{fallback or 'default'}.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def _on_ramfs(store: Path, command: str, cfg: Path, timeout: float) -> subprocess.CompletedProcess | None:
    """Run `command` with `store` a fresh ramfs mount; None if it was still running at `timeout`."""
    script = f"mount -t ramfs none {store} && SLURM_MM_CONFIG={cfg} exec {command}"
    try:
        return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def test_agent_and_config_check_refuse_a_store_without_acls(cluster, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    cfg = _config(cluster, tmp_path, store, None)
    agent = f"{tc.PYTHON} -I -m slurm_mm.agent --node n1 --socket {tmp_path}/agent.sock"
    res = _on_ramfs(store, agent, cfg, timeout=20)
    assert res is not None, "the agent started on a store without ACLs"
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "without POSIX ACLs" in lines[0] and str(store) in lines[0], res.stderr
    res = _on_ramfs(store, f"{tc.PYTHON} -I -m slurm_mm.cli config check", cfg, timeout=30)
    assert res is not None and res.returncode != 0, res
    assert "without POSIX ACLs" in res.stderr and "Traceback" not in res.stderr, res.stderr
    # The documented opt-in: the agent serves.
    opted = _config(cluster, tmp_path, store, "group")
    assert _on_ramfs(store, agent.replace("agent.sock", "agent2.sock"), opted, timeout=8) is None
    res = _on_ramfs(store, f"{tc.PYTHON} -I -m slurm_mm.cli config check", opted, timeout=30)
    assert res is not None and res.returncode == 0, res
