"""Shared fixtures: a real meshray cluster (embedded etcd + node daemon)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ray():
    """meshray initialised with a private 2-CPU cluster for one test module."""
    import meshray
    meshray.init(num_cpus=2, object_store_memory=512 * 1024 * 1024)
    yield meshray
    meshray.shutdown()


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, message: str = ""):
    """Poll `predicate` until it is truthy or the deadline passes (then fail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s: {message or predicate}")


def run_driver(code: str, timeout: float = 60.0, env=None) -> subprocess.CompletedProcess:
    """Run a driver script in a fresh interpreter and return its outcome."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)
