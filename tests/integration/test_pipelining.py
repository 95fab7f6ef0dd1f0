"""Short tasks pipelined onto busy workers keep their semantics.

A function whose runs are short gets several tasks queued on one worker
(meshray/node/pipelining.py). These tests make the leader of such a queue
slow on purpose, so followers sit queued behind it, then cancel a follower
or kill the worker.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import cloudpickle
import pytest

from tests.helpers import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(autouse=True)
def through_the_node(monkeypatch):
    """The node's pipelining is under test: every task goes through the node
    (one pushed on a worker lease never meets the node's pipeline)."""
    monkeypatch.setenv("MESHRAY_WORKER_LEASES", "0")


def node_log(cluster) -> str:
    path = os.path.join(cluster.head_node._process.session_dir, "node.log")
    return open(path).read() if os.path.exists(path) else ""


def run(value, delay, directory):
    if directory:
        open(os.path.join(directory, f"{value}-{os.getpid()}"), "w").close()
    if delay:
        time.sleep(delay)
    return value


def warm_up(ray, fn):
    """Enough short runs for the node to call this function short."""
    assert ray.get([fn.remote(i, 0, "") for i in range(50)], timeout=60) == list(range(50))


def test_a_cancelled_follower_never_runs(cluster, tmp_path):
    ray = cluster.connect()
    fn = ray.remote(max_retries=3)(run)
    warm_up(ray, fn)
    leader = fn.remote("leader", 1.5, str(tmp_path))
    followers = [fn.remote(f"f{i}", 0, str(tmp_path)) for i in range(3)]
    wait_for(lambda: any(n.startswith("leader-") for n in os.listdir(tmp_path)),
             message="the slow leader started")
    ray.cancel(followers[-1])
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(followers[-1], timeout=30)
    assert ray.get(followers[:-1], timeout=30) == ["f0", "f1"]
    assert ray.get(leader, timeout=30) == "leader"
    assert not any(n.startswith("f2-") for n in os.listdir(tmp_path))


def test_followers_of_a_dead_worker_run_elsewhere(cluster, tmp_path):
    ray = cluster.connect()
    fn = ray.remote(max_retries=3)(run)
    warm_up(ray, fn)
    leader = fn.remote("leader", 3, str(tmp_path))
    followers = [fn.remote(i, 0, "") for i in range(3)]
    started = wait_for(lambda: [n for n in os.listdir(tmp_path) if n.startswith("leader-")],
                       message="the slow leader started")
    os.kill(int(started[0].split("-")[1]), signal.SIGKILL)
    assert ray.get(followers, timeout=60) == [0, 1, 2]
    assert ray.get(leader, timeout=60) == "leader"
    assert "pipelined task(s) queued; placing them again" in node_log(cluster)
