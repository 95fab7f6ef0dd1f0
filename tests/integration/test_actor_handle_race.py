"""A fresh actor's handle works on another node before etcd has its record.

The creating node writes an actor's first record to etcd from a queue, so a
handle passed to a task right after `.remote()` can reach another node
first. That node must ask the creator (named by the actor id's prefix)
rather than call the actor unknown: before it did, about four calls in ten
failed with "the actor is unknown to the cluster" (examples/cluster_job.py's
Tally step, in the podman cluster too).
"""
from __future__ import annotations

import sys

import cloudpickle

cloudpickle.register_pickle_by_value(sys.modules[__name__])

TRIALS = 8


def test_fresh_actor_handle_is_usable_at_once_on_another_node(cluster):
    other = cluster.add_node(num_cpus=1)
    ray = cluster.connect()
    from meshray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    class Tally:
        def add(self, value):
            return value

    @ray.remote(num_cpus=1)
    def call(tally, value):
        import meshray
        return meshray.get(tally.add.remote(value)), \
            meshray.get_runtime_context().get_node_id()

    on_other = NodeAffinitySchedulingStrategy(other.node_id, soft=False)
    for trial in range(TRIALS):
        tally = Tally.remote()       # created on the driver's node (the head)
        refs = [call.options(scheduling_strategy=on_other).remote(tally, trial * 10 + i)
                for i in range(3)]
        results = ray.get(refs, timeout=60)
        assert results == [(trial * 10 + i, other.node_id) for i in range(3)], trial
        ray.kill(tally)
