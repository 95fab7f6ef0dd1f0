"""LeaseFence: the node's lease deadline as workers see it."""
from __future__ import annotations

import math
import time

from meshray.node.fence import FENCE_ENV, LeaseFence


def test_a_new_fence_is_open_until_the_first_registration(tmp_path):
    fence = LeaseFence.create(str(tmp_path / "f"))
    assert fence.valid_until == math.inf and fence.valid()


def test_workers_see_the_deadline_the_daemon_writes(tmp_path, monkeypatch):
    path = str(tmp_path / "f")
    daemon_side = LeaseFence.create(path)
    monkeypatch.setenv(FENCE_ENV, path)
    worker_side = LeaseFence.from_env()
    daemon_side.set(time.monotonic() + 60)
    assert worker_side.valid()
    daemon_side.set(time.monotonic() - 0.001)     # a resumed node: deadline passed
    assert not worker_side.valid()
    daemon_side.set(time.monotonic() + 60)        # registered again
    assert worker_side.valid()
    daemon_side.revoke()
    assert not worker_side.valid() and worker_side.valid_until == 0.0


def test_no_fence_without_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(FENCE_ENV, raising=False)
    assert LeaseFence.from_env() is None
    monkeypatch.setenv(FENCE_ENV, str(tmp_path / "missing"))
    assert LeaseFence.from_env() is None
