"""The compose topology as processes (3 etcd members, 3 nodes) survives a node
and an etcd-leader kill while a job runs (scripts/local_topology.py)."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_job_survives_node_and_etcd_leader_kill():
    result = subprocess.run([sys.executable, "scripts/local_topology.py", "--tasks", "40"],
                            capture_output=True, text=True, cwd=REPO, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "fault: SIGKILL node" in result.stdout
    assert "the leader" in result.stdout
    assert "OK" in result.stdout.splitlines()[-1]
