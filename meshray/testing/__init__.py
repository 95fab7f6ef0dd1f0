"""Test helpers: a multi-node cluster of real daemons on this machine.

`Cluster` has Ray's `ray.cluster_utils.Cluster` interface; `ClusterEngine`
is what it (and the chaos runner, and the topology script) is built on.
"""
from meshray.testing.cluster import Cluster, ClusterNode
from meshray.testing.engine import ClusterEngine

__all__ = ["Cluster", "ClusterEngine", "ClusterNode"]
