"""Failure handling the chaos harness found wanting, one regression per bug.

Each test is the reduced repro of a bug recorded in docs/chaos.md ("meshray
bugs found by these runs"), run against real daemons, workers and etcd. Lease
TTL is 2 s (meshray.testing.Cluster), so "past its lease" means > 2 s.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import cloudpickle
import numpy as np
import psutil
import pytest

from meshray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tests.helpers import process_gone, wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def node_of():
    import meshray
    return meshray.get_runtime_context().get_node_id()


def freeze(node, sig) -> None:
    """SIGSTOP/SIGCONT a node daemon and its workers, as a paused machine would be."""
    daemon = psutil.Process(node.pid)
    for proc in [daemon] + daemon.children(recursive=True):
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def test_spilled_task_is_retried_when_its_worker_dies(cluster, tmp_path):
    """Bug 2: retries applied only to tasks whose owner was a local driver."""
    far = cluster.add_node(num_cpus=1, resources={"far": 1})
    ray = cluster.connect()

    @ray.remote(max_retries=5, resources={"far": 1})
    def slow(directory):
        open(os.path.join(directory, str(os.getpid())), "w").close()
        time.sleep(1.0)
        return node_of()

    ref = slow.remote(str(tmp_path))
    first_pid = int(wait_for(lambda: os.listdir(tmp_path), message="task started on far")[0])
    os.kill(first_pid, signal.SIGKILL)
    assert ray.get(ref, timeout=60) == far.node_id
    assert len(os.listdir(tmp_path)) == 2   # the first attempt and its retry


def test_actor_caller_reaches_restarted_actor_promptly_after_node_death(cluster):
    """Bug 1: after the stream broke, callers waited the 60 s resolve timeout."""
    first = cluster.add_node(num_cpus=1, resources={"v": 1})
    second = cluster.add_node(num_cpus=1, resources={"v": 1})
    ray = cluster.connect()

    @ray.remote(max_restarts=-1, max_task_retries=-1, resources={"v": 1}, num_cpus=0)
    class Where:
        def node(self):
            return node_of()

    actor = Where.remote()
    home = ray.get(actor.node.remote(), timeout=30)
    victim, survivor = (first, second) if home == first.node_id else (second, first)
    cluster.remove_node(victim, allow_graceful=False)
    # Well under the 60 s resolve timeout: the lease (2 s) plus a restart.
    assert ray.get(actor.node.remote(), timeout=25) == survivor.node_id


def test_actor_caller_recovers_promptly_when_only_the_stream_broke(cluster):
    """Bug 1, second case: the actor lives on, no new incarnation ever comes.

    The host's actor workers drop a fifth of incoming call messages (a
    failpoint that ends the stream, as a network blip would); every call must
    still complete against the same incarnation, long before the 60 s resolve
    timeout the callers used to wait.
    """
    cluster.add_node(num_cpus=1, resources={"v": 1},
                     env={"MESHRAY_FAILPOINTS": "actor.call=drop(0.2)"})
    ray = cluster.connect()

    @ray.remote(max_task_retries=-1, resources={"v": 1}, num_cpus=0)
    class Counter:
        def __init__(self):
            self.calls = 0

        def incr(self):
            self.calls += 1
            return os.getpid()

        def count(self):
            return self.calls

    counter = Counter.remote()
    pids = set()
    for _ in range(20):   # one at a time, so every drop strands exactly one call
        pids.add(ray.get(counter.incr.remote(), timeout=20))
    assert len(pids) == 1                      # never restarted
    assert ray.get(counter.count.remote(), timeout=20) >= 20


def test_failed_pulls_are_retried_while_the_holder_lives(cluster, tmp_path):
    """Bug 4: one failed PullObject made the reader report the object lost."""
    failpoints = tmp_path / "failpoints"
    failpoints.write_text("peer.pull=drop(1)")   # every pull from the holder fails
    holder = cluster.add_node(num_cpus=1, env={"MESHRAY_FAILPOINTS_FILE": str(failpoints)})
    reader = cluster.add_node(num_cpus=1)
    ray = cluster.connect()
    made = tmp_path / "made"

    @ray.remote(max_retries=3)
    def make(path):
        with open(path, "a") as log:
            log.write("x")
        return np.ones(1_000_000)

    @ray.remote(max_retries=0)
    def total(array):
        return float(array.sum())

    ref = make.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        holder.node_id, soft=False)).remote(str(made))
    ray.wait([ref], timeout=30)
    out = total.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        reader.node_id, soft=False)).remote(ref)
    # Pulls keep failing until the fault is lifted; the reader keeps trying.
    wait_for(lambda: "pulling" in read_log(reader), timeout=20, message="a pull failed")
    failpoints.write_text("")
    assert ray.get(out, timeout=60) == 1_000_000.0
    assert made.read_text() == "x"    # pulled, not rebuilt: the holder was alive


def read_log(node) -> str:
    path = os.path.join(node._process.session_dir, "node.log")
    return open(path).read() if os.path.exists(path) else ""


def test_reader_gets_a_rebuilt_copy_when_the_holder_dies(cluster, tmp_path):
    """A holder that dies: the owner re-runs the producer and the reader pulls that copy."""
    holder = cluster.add_node(num_cpus=1, resources={"h": 1})
    reader = cluster.add_node(num_cpus=1, resources={"r": 1})
    cluster.add_node(num_cpus=1, resources={"h": 1})
    ray = cluster.connect()

    @ray.remote(max_retries=3, resources={"h": 1})
    def make():
        return np.full(1_000_000, 2.0)

    @ray.remote(max_retries=0, resources={"r": 1})
    def total(array):
        return float(array.sum())

    ref = make.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        holder.node_id, soft=True)).remote()
    ray.wait([ref], timeout=30)
    cluster.remove_node(holder, allow_graceful=False)
    assert ray.get(total.remote(ref), timeout=60) == 2_000_000.0
    assert reader.node_id in {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def pause_past_lease(ray, node) -> None:
    """Stop a node until the cluster declares it dead, then let it run again."""
    freeze(node, signal.SIGSTOP)
    try:
        wait_for(lambda: node.node_id not in {n["NodeID"] for n in ray.nodes() if n["Alive"]},
                 timeout=30, message="the paused node's lease expires")
    finally:
        freeze(node, signal.SIGCONT)


def test_task_whose_argument_sat_on_a_paused_node_is_rebuilt(cluster):
    """Bug 5: the reader's pull to a paused holder hung; the owner's rebuild was never used."""
    victim = cluster.add_node(num_cpus=1)
    other = cluster.add_node(num_cpus=1)
    ray = cluster.connect()

    @ray.remote(max_retries=3)
    def produce():
        return np.full(1_000_000, 3.0)

    @ray.remote(max_retries=3)
    def consume(array):
        return float(array.sum())

    array = produce.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        victim.node_id, soft=True)).remote()
    ray.wait([array], timeout=30)
    freeze(victim, signal.SIGSTOP)
    try:
        out = consume.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            other.node_id, soft=False)).remote(array)
        wait_for(lambda: victim.node_id not in {n["NodeID"] for n in ray.nodes() if n["Alive"]},
                 timeout=30, message="the paused node's lease expires")
    finally:
        freeze(victim, signal.SIGCONT)
    assert ray.get(out, timeout=60) == 3_000_000.0


def test_actor_on_a_node_back_from_a_lapsed_lease_runs_as_one_incarnation(cluster):
    """Bug 6 and fencing: after the pause, calls reach a new incarnation, never the old one."""
    victim = cluster.add_node(num_cpus=1, resources={"v": 5})
    ray = cluster.connect()

    @ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0, resources={"v": 1})
    class Pid:
        def pid(self):
            return os.getpid()

    actor = Pid.remote()
    old_pid = ray.get(actor.pid.remote(), timeout=30)
    pause_past_lease(ray, victim)
    # The first call after the resume may race the node noticing its lapsed
    # lease; the old worker must refuse it (fence), not answer it.
    new_pid = ray.get(actor.pid.remote(), timeout=60)
    assert new_pid != old_pid
    wait_for(lambda: process_gone(old_pid), message="the old incarnation's worker is stopped")


def test_actor_pinned_to_a_node_that_lapsed_dies_with_the_reason(cluster):
    """Hard affinity to a node the cluster declared dead: ActorDiedError naming why, no hang."""
    victim = cluster.add_node(num_cpus=1, resources={"v": 5})
    ray = cluster.connect()

    @ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0, resources={"v": 1})
    class Pid:
        def pid(self):
            return os.getpid()

    actor = Pid.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        victim.node_id, soft=False)).remote()
    ray.get(actor.pid.remote(), timeout=30)
    pause_past_lease(ray, victim)
    with pytest.raises(ray.exceptions.ActorDiedError, match="ActorUnschedulableError"):
        ray.get(actor.pid.remote(), timeout=60)


@pytest.mark.cluster_args(head_node_args={"num_cpus": 0}, lease_ttl=60)
def test_a_killed_node_is_seen_dead_long_before_its_lease_expires(tmp_path, cluster):
    """A daemon whose port refuses connections is gone: a peer revokes its lease."""
    victim = cluster.add_node(num_cpus=1)
    ray = cluster.connect()

    @ray.remote(num_cpus=1, max_retries=2)
    def mark(directory):
        path = os.path.join(directory, "started")
        if os.path.exists(path):
            return "retried"
        open(path, "w").close()
        time.sleep(120)
        return "first attempt"

    ref = mark.remote(str(tmp_path))
    wait_for(lambda: os.listdir(tmp_path), message="the task started on the victim")
    spare = cluster.add_node(num_cpus=1)
    cluster.remove_node(victim, allow_graceful=False)
    # The lease is 60 s: only the refusal evidence can end it within 20 s.
    wait_for(lambda: victim.node_id not in {n["NodeID"] for n in ray.nodes() if n["Alive"]},
             timeout=20, message="the killed node leaves the view")
    assert ray.get(ref, timeout=30) == "retried"
    assert spare.node_id in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
