"""The compose topology as processes (3 etcd members, 3 nodes) survives a node
and an etcd-leader kill while a job runs (scripts/local_topology.py): on
loopback ports, and -- as root -- with every member and node in a network
namespace of its own.

Each run gets a private TMPDIR and run dir and a marker in its environment
(inherited by etcd, daemons and workers), so the test can check that the
script left nothing behind -- processes, dirs, shared memory, namespaces,
links -- without confusing its leftovers with anything else on the machine.
"""
from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

from meshray.testing.netns import netns_available
from tests.helpers import REPO

MARKER_ENV = "MESHRAY_TOPOLOGY_TEST"


def _marked_pids(marker: str) -> list[int]:
    """Live processes whose environment carries our marker."""
    needle = f"{MARKER_ENV}={marker}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if needle in handle.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:      # gone meanwhile, or a zombie
            continue
    return pids


def _wait_no_processes(marker: str, timeout: float = 15.0) -> list[int]:
    """Workers die with their daemon a moment after it exits; wait for that."""
    deadline = time.monotonic() + timeout
    while True:
        left = _marked_pids(marker)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _netns_leftovers(tag: str) -> list[str]:
    prefix = f"mr{tag}"
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           timeout=15).stdout.split()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                           timeout=15).stdout.splitlines()
    found = [n for n in names if n.startswith(prefix)]
    for line in links:
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(prefix):
            found.append(name)
    return found


def _run_topology(tmp_path, *flags: str) -> tuple[str, dict]:
    """Run the script; assert it passed and cleaned up; return its stdout."""
    marker = uuid.uuid4().hex
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = dict(os.environ, TMPDIR=str(tmpdir), MESHRAY_RUN_DIR=str(tmp_path / "run"),
               **{MARKER_ENV: marker})
    env.pop("MESHRAY_PREFERRED_NODE", None)
    tag = None
    try:
        result = subprocess.run([sys.executable, "scripts/local_topology.py", "--tasks", "40",
                                 *flags], capture_output=True, text=True, cwd=REPO,
                                timeout=150, env=env)
        out = result.stdout
        found = re.search(r"^netns lab: tag (\w+)", out, re.M)
        tag = found.group(1) if found else None
        assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
        assert "fault: SIGKILL node" in out
        assert "(the leader)" in out
        lines = out.splitlines()
        assert lines[-2:] == ["OK", "torn down"], out[-3000:]
        assert "40 results from" in out and "wrong: []" in out

        left = _wait_no_processes(marker)
        assert not left, f"processes left behind: {left}"
        assert not os.listdir(tmpdir), f"left in TMPDIR: {os.listdir(tmpdir)}"
        records = tmp_path / "run" / "nodes"
        assert not records.exists() or not os.listdir(records), os.listdir(records)
        node_ids = re.findall(r"(\w{12})@", re.search(r"^nodes: (.*)$", out, re.M).group(1))
        assert len(node_ids) == 3
        shm = [f"/dev/shm/meshray-{n}" for n in node_ids if os.path.exists(f"/dev/shm/meshray-{n}")]
        assert not shm, f"object stores left behind: {shm}"
        if tag is not None:
            assert _netns_leftovers(tag) == []
        return out, {"tag": tag}
    finally:
        # Best effort after a failure or timeout: end what this run started
        # (found by its marker, killed by pid) and drop its namespaces.
        for pid in _marked_pids(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if tag is not None:
            for name in _netns_leftovers(tag):
                subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=15)
                subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=15)


def test_job_survives_node_and_etcd_leader_kill(tmp_path):
    out, _ = _run_topology(tmp_path, "--loopback")
    assert out.splitlines()[0] == "mode: loopback"
    assert "node addresses seen by the driver: 127.0.0.1:" in out


def _hosts(line_prefix: str, out: str) -> list[str]:
    line = re.search(rf"^{re.escape(line_prefix)}(.*)$", out, re.M).group(1)
    return [item.strip().rsplit(":", 1)[0] for item in line.split(",")]


def test_netns_topology_survives_node_and_etcd_leader_kill(tmp_path):
    reason = netns_available()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable here: {reason}")
    out, info = _run_topology(tmp_path, "--netns")
    assert out.splitlines()[0] == "mode: netns"
    assert info["tag"], out
    subnet = ipaddress.ip_network(re.search(r"^netns lab: .*\((.*)\)$", out, re.M).group(1))
    etcd_hosts = _hosts("etcd members: ", out)
    node_hosts = _hosts("node addresses seen by the driver: ", out)
    # One address per "host": 3 members and 3 nodes, all distinct, all on the
    # namespaces' bridge subnet -- none on loopback.
    assert len(etcd_hosts) == 3 and len(node_hosts) == 3
    assert len(set(etcd_hosts) | set(node_hosts)) == 6, out
    for host in etcd_hosts + node_hosts:
        assert ipaddress.ip_address(host) in subnet, (host, subnet)
