"""The compose topology in real containers (deploy/podman/run_cluster.py):
3 etcd members and 3 nodes, one podman container each, run a job, lose a node
and the etcd leader to `podman kill`, see the node dead, run another job, and
leave no container, network, volume or temp file behind.

Skips, saying how to get the tools, where podman, runc, catatonit or
debootstrap are missing, when not root, or when the script finds that
containers cannot start on this machine. The first run builds the base image
with debootstrap (about 80 s here) and keeps both images as a cache.
MESHRAY_PODMAN_TEST=0 skips it.
"""
from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
import secrets
import subprocess
import sys

import pytest

from tests.helpers import REPO

SCRIPT = os.path.join(REPO, "deploy", "podman", "run_cluster.py")
INSTALL = "apt-get install podman runc debootstrap catatonit"
LABEL = "io.meshray.podman"


def _skip_reason() -> str | None:
    if os.environ.get("MESHRAY_PODMAN_TEST") == "0":
        return "MESHRAY_PODMAN_TEST=0"
    spec = importlib.util.spec_from_file_location("run_cluster", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    missing = script.missing_tools()
    if missing:
        return f"{', '.join(missing)} not installed; as root: {INSTALL}"
    if os.geteuid() != 0:
        return "needs root (debootstrap, and rootful podman so the host reaches the containers)"
    return None


def _left_over(prefix: str) -> list[str]:
    """This run's containers, networks and volumes that still exist."""
    found = []
    for listing in (["ps", "--all"], ["network", "ls"], ["volume", "ls"]):
        out = subprocess.run(["podman", *listing, "--quiet", "--filter",
                              f"label={LABEL}={prefix}"], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        found += [f"{listing[0]} {item}" for item in out.stdout.split()]
    return found


@pytest.mark.timeout(900)
def test_podman_cluster_survives_node_and_etcd_leader_kill(tmp_path):
    reason = _skip_reason()
    if reason:
        pytest.skip(f"podman cluster: {reason}")
    prefix = f"mrpodt{secrets.token_hex(3)}"
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = dict(os.environ, TMPDIR=str(tmpdir), PYTHONPATH=REPO)
    try:
        result = subprocess.run([sys.executable, SCRIPT, "--prefix", prefix],
                                capture_output=True, text=True, cwd=REPO, timeout=840, env=env)
        if result.returncode == 77:
            pytest.skip(f"podman cluster: {result.stderr.strip()[-800:]}")
        out = result.stdout
        assert result.returncode == 0, out[-6000:] + result.stderr[-3000:]
        lines = out.splitlines()
        assert lines[-1] == "OK" and lines[-2].startswith("timings: "), out[-3000:]
        assert lines[-3] == "torn down (containers, network, volumes; images kept as a cache)"
        assert f"prefix: {prefix}" in out

        # One address per container, all on the run's podman network: nodes
        # advertise their container's address, not loopback or the host's.
        subnet = ipaddress.ip_network(re.search(r"^network \S+: (\S+)$", out, re.M).group(1))
        etcd = [a.rsplit(":", 1)[0] for a in
                re.search(r"^etcd members: (.*)$", out, re.M).group(1).split(", ")]
        nodes = re.search(r"^node addresses seen by node1: (.*)$", out, re.M).group(1).split(", ")
        assert len(etcd) == 3 and len(nodes) == 3 and len(set(etcd) | set(nodes)) == 6, out
        assert all(ipaddress.ip_address(a) in subnet for a in etcd + nodes), (subnet, out)

        # The job before the faults used all 3 nodes, the one after both survivors.
        assert re.search(rf"^job {prefix}-before: SUCCEEDED on 3 nodes$", out, re.M), out
        assert re.search(r"^  \| 3 worker node\(s\)", out, re.M), out
        assert re.search(r"^  \|   8 MiB object read on 3 node\(s\), intact$", out, re.M), out
        assert re.search(r"^  \|   actor calls came from 3 node\(s\)$", out, re.M), out
        victim = re.search(r"^fault: podman kill \S+-node3 \(node (\w+), SIGKILL\)$", out,
                           re.M).group(1)
        assert re.search(r"^fault: podman kill \S+-etcd\d \(the etcd leader, ", out, re.M), out
        assert f"node {victim} is DEAD as seen by node1 and node2" in out
        assert f"meshray status on node1: {victim} DEAD" in out
        assert re.search(rf"^job {prefix}-before as node2 sees it after the faults: SUCCEEDED$",
                         out, re.M), out
        assert re.search(rf"^job {prefix}-after: SUCCEEDED on 2 nodes$", out, re.M), out
        assert re.search(r"^  \| 2 worker node\(s\)", out, re.M), out

        assert _left_over(prefix) == []
        assert os.listdir(tmpdir) == [], "the script left files in its TMPDIR"
    finally:
        if _left_over(prefix):
            subprocess.run([sys.executable, SCRIPT, "--teardown", prefix], capture_output=True,
                           timeout=300, env=env)

