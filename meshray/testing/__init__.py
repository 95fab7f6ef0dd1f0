"""Test helpers: a multi-node cluster of real daemons on this machine."""
from meshray.testing.cluster import Cluster, ClusterNode

__all__ = ["Cluster", "ClusterNode"]
