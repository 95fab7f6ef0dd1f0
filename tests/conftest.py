"""Fixtures and hooks for every test; shared helpers live in tests/helpers.py."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray():
    """meshray initialised with a private 2-CPU cluster for one test module."""
    import meshray
    meshray.init(num_cpus=2, object_store_memory=512 * 1024 * 1024)
    yield meshray
    meshray.shutdown()
