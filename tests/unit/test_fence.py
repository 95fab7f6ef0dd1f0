"""LeaseFence: the node's lease deadline as workers see it."""
from __future__ import annotations

import math
import time

from meshray.common.fence import FENCE_ENV, LeaseFence, fence_applies


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


def test_an_actor_bound_to_a_lease_refuses_every_later_lease(tmp_path, monkeypatch):
    path = str(tmp_path / "f")
    daemon_side = LeaseFence.create(path)
    monkeypatch.setenv(FENCE_ENV, path)
    worker_side = LeaseFence.from_env()
    daemon_side.set(time.monotonic() + 60, 0x1A)
    assert worker_side.lease_id == 0x1A and worker_side.valid(0x1A)
    daemon_side.set(time.monotonic() - 0.001)          # lapsed, same lease
    assert not worker_side.valid(0x1A)
    daemon_side.set(time.monotonic() + 60, 0x1A)       # etcd kept the lease
    assert worker_side.valid(0x1A)
    daemon_side.set(time.monotonic() + 60, 0x2B)       # lost it, registered again
    assert worker_side.valid() and worker_side.valid(0x2B)
    assert not worker_side.valid(0x1A)


def test_only_actors_created_for_another_node_are_fenced():
    here = bytes.fromhex("aaaaaaaaaaaa") + b"\x00" * 10
    task_from_here = here[:6] + b"\x01" * 10
    task_from_there = bytes.fromhex("bbbbbbbbbbbb") + b"\x01" * 10
    assert not fence_applies(task_from_here, here, 6)
    assert fence_applies(task_from_there, here, 6)
