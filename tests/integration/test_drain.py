"""A node told to stop (SIGTERM) drains: real daemons, workers and etcd.

The lease TTL is 30 s here, so a record that leaves etcd within seconds of
the drain's end was revoked, not left to expire. The draining node gets its
drain timeout from MESHRAY_DRAIN_TIMEOUT_S (a test cluster's nodes stop at
once on SIGTERM without it; `meshray start` nodes always drain).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request

import cloudpickle
import pytest

from meshray.cli.health import check as health_check
from meshray.node.drain import DRAIN_TIMEOUT_ENV
from meshray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tests.helpers import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

LEASE_TTL_S = 30.0
pytestmark = pytest.mark.cluster_args(lease_ttl=LEASE_TTL_S, head_node_args={"num_cpus": 0})


def _gated(started: str, gate: str) -> str:
    """Run until `gate` exists (at most 100 s), then say where it ran."""
    import meshray
    open(started, "w").close()
    deadline = time.monotonic() + 100
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)
    return meshray.get_runtime_context().get_node_id()


def _where() -> str:
    import meshray
    return meshray.get_runtime_context().get_node_id()


def _record(cluster, node) -> dict | None:
    return cluster.engine.registered().get(node.node_id)


def _health(node_record: dict, path: str) -> tuple[int, dict]:
    """GET a health endpoint of a node, without any credential (as a kubelet)."""
    url = f"http://127.0.0.1:{node_record['DashboardPort']}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _exit_code(node, timeout: float) -> int:
    return node._process.process.wait(timeout=timeout)


def test_sigterm_drains_running_work_hands_back_queued_and_revokes_the_lease(cluster, tmp_path):
    drained = cluster.add_node(num_cpus=1, env={DRAIN_TIMEOUT_ENV: "60"})
    ray = cluster.connect()
    started, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    running = ray.remote(num_cpus=1, max_retries=0)(_gated).remote(started, gate)
    wait_for(lambda: os.path.exists(started), timeout=60, message="the gated task started")
    base_url = f"http://127.0.0.1:{_record(cluster, drained)['DashboardPort']}"
    assert _health(_record(cluster, drained), "/api/healthz") == (200, {"status": "success"})
    assert health_check(base_url)[0] is True              # `meshray health-check`
    # Submitted before the drain: it can only wait for the draining node's CPU.
    queued = ray.remote(num_cpus=1, max_retries=0)(_where).remote()

    os.kill(drained.pid, signal.SIGTERM)
    began = time.monotonic()
    record = wait_for(lambda: (_record(cluster, drained) or {}).get("Draining"),
                      timeout=20, message="the node record says it drains")
    assert record["reason"] == "DRAIN_NODE_REASON_PREEMPTION"
    assert record["reason_message"] == "SIGTERM"
    node_record = _record(cluster, drained)
    assert _health(node_record, "/api/healthz") == (503, {"status": "failed",
                                                          "reason": "draining"})
    assert _health(node_record, "/api/local_raylet_healthz") == (200, {"status": "success"})
    assert health_check(base_url) == (False, f"{base_url}/api/healthz: HTTP 503: draining")
    assert health_check(base_url, "liveness")[0] is True

    other = cluster.add_node(num_cpus=1)
    # After the drain began, a task that prefers the draining node (it has
    # room for it: the running task holds its only CPU, but soft affinity
    # would wait) runs elsewhere; so does the one queued before.
    prefers = ray.remote(num_cpus=0)(_where).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(drained.node_id, soft=True))
    assert ray.get(prefers.remote(), timeout=60) != drained.node_id
    assert ray.get(queued, timeout=60) == other.node_id
    assert not os.path.exists(gate)        # all while the running task still ran

    open(gate, "w").close()
    assert ray.get(running, timeout=30) == drained.node_id
    released = time.monotonic()
    wait_for(lambda: _record(cluster, drained) is None, timeout=LEASE_TTL_S / 3,
             message="the drained node's record left etcd (its lease revoked)")
    assert time.monotonic() - released < LEASE_TTL_S / 3
    assert _exit_code(drained, timeout=30) == 0
    assert time.monotonic() - began < 60 + 10     # the drain timeout, plus the stop


def _drain_with_a_stuck_task(cluster, tmp_path, drain_timeout: str):
    """A node running a task that never ends, told to drain; (node, ray, task ref)."""
    drained = cluster.add_node(num_cpus=1, env={DRAIN_TIMEOUT_ENV: drain_timeout})
    ray = cluster.connect()
    started, gate = str(tmp_path / "started"), str(tmp_path / "never")
    stuck = ray.remote(num_cpus=1, max_retries=0)(_gated).remote(started, gate)
    wait_for(lambda: os.path.exists(started), timeout=60, message="the task started")
    os.kill(drained.pid, signal.SIGTERM)
    wait_for(lambda: (_record(cluster, drained) or {}).get("Draining"), timeout=10,
             message="the node drains")
    return drained, ray, stuck


def test_drain_deadline_ends_a_task_that_does_not_finish(cluster, tmp_path):
    drained, ray, stuck = _drain_with_a_stuck_task(cluster, tmp_path, "5")
    assert _exit_code(drained, timeout=30) == 0      # 5 s drain, then the stop
    with pytest.raises((ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)):
        ray.get(stuck, timeout=60)


def test_second_sigterm_stops_a_draining_node_at_once(cluster, tmp_path):
    drained, _ray, _stuck = _drain_with_a_stuck_task(cluster, tmp_path, "300")
    os.kill(drained.pid, signal.SIGTERM)
    # Far below the 300 s drain timeout: the second signal ended the drain.
    assert _exit_code(drained, timeout=60) == 0
