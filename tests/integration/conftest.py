"""Fixtures the integration tests share: a multi-node cluster, a bare etcd, the
driver's node."""
from __future__ import annotations

import pytest

DEFAULT_CLUSTER_ARGS = {"initialize_head": True, "head_node_args": {"num_cpus": 1}}


@pytest.fixture
def cluster(request):
    """A `meshray.testing.Cluster` with a one-CPU head node, shut down after
    the test. ``pytest.mark.cluster_args(**kwargs)`` on the test or module
    overrides `Cluster`'s arguments (e.g. other head node resources)."""
    from meshray.testing import Cluster
    marker = request.node.get_closest_marker("cluster_args")
    cluster = Cluster(**{**DEFAULT_CLUSTER_ARGS, **(marker.kwargs if marker else {})})
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="module")
def etcd(request, tmp_path_factory):
    """A lone etcd member without auth, for one module's client-level tests.
    ``pytest.mark.etcd_args(**kwargs)`` on the module adds `EmbeddedEtcd`
    arguments."""
    from meshray.coordination.embedded import EmbeddedEtcd
    marker = request.node.get_closest_marker("etcd_args")
    server = EmbeddedEtcd(tmp_path_factory.mktemp("etcd") / "single", unsafe_no_fsync=True,
                          **(marker.kwargs if marker else {}))
    server.start()
    try:
        yield server
    finally:
        server.stop()
    assert not server.is_running()


@pytest.fixture(scope="module")
def local_node(ray):
    """The node daemon the module's driver (the `ray` fixture) attached to."""
    from meshray.core import state as state_mod
    return state_mod.state.local_node
