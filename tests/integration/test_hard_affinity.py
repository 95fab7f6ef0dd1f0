"""Hard node affinity never runs a task or actor anywhere but its node, however busy.

A driver's node with free CPUs must not take tasks or actors pinned to a
small peer just because the peer is busy when they arrive: they wait for the
peer.
"""
from __future__ import annotations

import sys

import cloudpickle
import pytest

# Workers do not have this test module on their path: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _where(delay: float) -> str:
    import time

    import meshray
    time.sleep(delay)
    return meshray.get_runtime_context().get_node_id()


@pytest.mark.cluster_args(head_node_args={"num_cpus": 4})
def test_flood_of_hard_pinned_tasks_waits_for_the_small_node(cluster):
    small = cluster.add_node(num_cpus=1)
    ray = cluster.connect()
    from meshray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    where = ray.remote(num_cpus=1)(_where)
    pinned = where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        small.node_id, soft=False))
    refs = [pinned.remote(0.3) for _ in range(6)]
    assert ray.get(refs, timeout=90) == [small.node_id] * 6
    # The driver's roomy node still runs unpinned work of the same shape meanwhile.
    assert ray.get(where.remote(0.0), timeout=60) in {cluster.head_node.node_id, small.node_id}


class _Placed:
    def node(self) -> str:
        import meshray
        return meshray.get_runtime_context().get_node_id()


@pytest.mark.cluster_args(head_node_args={"num_cpus": 4})
def test_hard_pinned_actor_waits_for_its_full_node_and_never_lands_elsewhere(cluster):
    small = cluster.add_node(num_cpus=1)
    ray = cluster.connect()
    from meshray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    pinned = ray.remote(num_cpus=1)(_Placed).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(small.node_id, soft=False))
    first = pinned.remote()
    assert ray.get(first.node.remote(), timeout=90) == small.node_id
    # The small node's one CPU is held; the head has four free. The second
    # actor must not start there: its call stays unanswered...
    second = pinned.remote()
    waiting = second.node.remote()
    ready, _ = ray.wait([waiting], timeout=3)
    assert not ready, f"a hard-pinned actor started while its node was full: {ray.get(ready)}"
    # ...until the small node has room again, and then it runs there.
    ray.kill(first)
    assert ray.get(waiting, timeout=90) == small.node_id


@pytest.mark.cluster_args(head_node_args={"num_cpus": 2})
def test_hard_pinned_task_fails_when_its_node_dies_while_it_waits(cluster):
    small = cluster.add_node(num_cpus=1)
    ray = cluster.connect()
    from meshray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    where = ray.remote(num_cpus=1, max_retries=0)(_where)
    pinned = where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        small.node_id, soft=False))
    refs = [pinned.remote(30.0) for _ in range(3)]
    cluster.remove_node(small)
    for ref in refs:
        with pytest.raises((ray.exceptions.TaskUnschedulableError,
                            ray.exceptions.WorkerCrashedError,
                            ray.exceptions.NodeDiedError)):
            ray.get(ref, timeout=60)
