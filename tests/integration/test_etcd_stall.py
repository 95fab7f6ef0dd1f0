"""Actors keep answering through an etcd stall, and call errors tell the truth.

etcd is frozen with SIGSTOP (as a stalled disk or a stopped VM would freeze
it) and thawed with SIGCONT. Healthy actors must answer every call made
meanwhile exactly once; a call that fails must say whether it may have run,
and one that never reached the actor must say it did not run.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

import cloudpickle
import psutil
import pytest

from meshray.core import actor_client
from meshray.common.fence import LeaseFence
from meshray.testing import Cluster
from tests.helpers import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

CALL_EVERY_S = 0.3


class Counter:
    """Counts its calls and appends each call's tag to a file: the file is
    the record of which calls ran, whatever their callers were told."""

    def __init__(self, path):
        self.calls = 0
        self.path = path

    def inc(self, tag):
        self.calls += 1
        with open(self.path, "a") as handle:
            handle.write(f"{tag}\n")
        return tag, self.calls

    def pid(self):
        return os.getpid()


class Relay:
    """Calls the counter from another node (whose first lookup reads etcd)."""

    def __init__(self, counter):
        self.counter = counter

    def ready(self):
        return True

    def forward(self, tag):
        import meshray
        return meshray.get(self.counter.inc.remote(tag), timeout=120)


def ran(path) -> list[str]:
    with open(path) as handle:
        return handle.read().split()


def freeze(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, timeout=10,
             message="etcd is stopped")


class Caller:
    """Calls `method` every CALL_EVERY_S from a thread; records each outcome."""

    def __init__(self, method, prefix: str, fence: LeaseFence | None = None):
        self.method, self.prefix, self.fence = method, prefix, fence
        self.outcomes: list[tuple] = []   # (tag, "ok" | error, value, fence valid at submit)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Caller:
        self._thread.start()
        return self

    def _run(self) -> None:
        import meshray
        index = 0
        while not self._stop.is_set():
            tag = f"{self.prefix}{index}"
            fenced = self.fence is not None and not self.fence.valid()
            ref = self.method.remote(tag)
            try:
                self.outcomes.append((tag, "ok", meshray.get(ref, timeout=120), fenced))
            except Exception as exc:  # noqa: BLE001 - recorded and asserted on
                self.outcomes.append((tag, exc, None, fenced))
            index += 1
            self._stop.wait(CALL_EVERY_S)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(150)
        assert not self._thread.is_alive(), "a call never returned"

    def errors(self) -> list[tuple]:
        return [o for o in self.outcomes if o[1] != "ok"]


def stall(etcd_pid: int, seconds: float, callers: list[Caller],
          start_when_frozen: tuple = ()) -> int:
    """Freeze etcd for `seconds` while the callers run (those in
    `start_when_frozen` start once it is frozen); returns how many calls were
    made during the stall. Callers are stopped after a few calls past it."""
    freeze(etcd_pid)
    try:
        for caller in start_when_frozen:
            caller.start()
        before = sum(len(c.outcomes) for c in callers)
        time.sleep(seconds)       # the fault itself: etcd stays frozen this long
        during = sum(len(c.outcomes) for c in callers) - before
    finally:
        os.kill(etcd_pid, signal.SIGCONT)
    after = sum(len(c.outcomes) for c in callers)
    wait_for(lambda: sum(len(c.outcomes) for c in callers) >= after + 3 * len(callers),
             timeout=120, message="calls go on after the stall")
    for caller in callers:
        caller.stop()
    return during


def fence_of(node) -> LeaseFence:
    process = node._process
    return LeaseFence(os.path.join(process.session_dir, f"lease-{node.node_id[:8]}.fence"),
                      writable=False)


def test_a_single_node_answers_every_actor_call_through_a_10s_etcd_stall(tmp_path):
    """Past the node's 5 s lease: it loses the lease and registers again, and
    its actors, which no peer could replace, never stop answering."""
    import meshray
    from meshray import _api
    meshray.init(num_cpus=1)
    try:
        etcd_pid = _api._state.local_node.info["etcd_pid"]
        log = tmp_path / "ran"
        counter = meshray.remote(Counter).remote(str(log))
        assert meshray.get(counter.inc.remote("warmup"), timeout=60) == ("warmup", 1)
        caller = Caller(counter.inc, "c").start()
        during = stall(etcd_pid, 10.0, [caller])
        assert during >= 10, f"only {during} calls were made while etcd was frozen"
        assert caller.errors() == []
        # None lost, none duplicated: each call ran once, in order.
        tags = [tag for tag, *_ in caller.outcomes]
        assert [value for _tag, _ok, value, _f in caller.outcomes] == [
            (tag, index + 2) for index, tag in enumerate(tags)]
        assert ran(log) == ["warmup"] + tags
    finally:
        meshray.shutdown()


def test_actors_on_a_cluster_answer_through_an_etcd_stall_shorter_than_the_lease(tmp_path):
    """7 s of frozen etcd (longer than an etcd request's 5 s timeout) under a
    15 s lease: a driver's calls to an actor on another node, and calls from
    a third node that must first look the actor up in etcd, all succeed."""
    cluster = Cluster(lease_ttl=15)
    try:
        cluster.add_node(num_cpus=1)
        cluster.add_node(num_cpus=1, resources={"b": 1})
        cluster.add_node(num_cpus=1, resources={"c": 1})
        ray = cluster.connect()
        log = tmp_path / "ran"
        counter = ray.remote(resources={"b": 0.1}, num_cpus=0)(Counter).remote(str(log))
        relay = ray.remote(resources={"c": 0.1}, num_cpus=0)(Relay).remote(counter)
        assert ray.get(counter.inc.remote("warmup"), timeout=60) == ("warmup", 1)
        assert ray.get(relay.ready.remote(), timeout=60)
        direct = Caller(counter.inc, "d").start()
        relayed = Caller(relay.forward, "r")   # its first call must look the counter up
        during = stall(cluster.etcd_pid, 7.0, [direct, relayed], start_when_frozen=(relayed,))
        assert during >= 5, f"only {during} calls were made while etcd was frozen"
        assert direct.errors() == [] and relayed.errors() == []
        answered = [value for caller in (direct, relayed)
                    for _tag, _ok, value, _f in caller.outcomes]
        # Every call ran exactly once: counts 2..N+1 with no gap or repeat.
        assert sorted(count for _tag, count in answered) == list(range(2, len(answered) + 2))
        assert sorted(ran(log)) == sorted(["warmup"] + [tag for tag, _count in answered])
    finally:
        cluster.shutdown()


def test_calls_refused_by_a_fenced_actor_run_once_on_its_next_incarnation(tmp_path):
    """A 5 s stall under a 2 s lease: the actor (created by another node,
    which may replace it) refuses calls once its node's fence lapses. Those
    calls never ran, so with max_task_retries=0 they still go to the actor
    that answers next -- the same one or its restart -- and run once."""
    cluster = Cluster(lease_ttl=2)
    try:
        cluster.add_node(num_cpus=1)
        host = cluster.add_node(num_cpus=1, resources={"b": 1})
        ray = cluster.connect()
        log = tmp_path / "ran"
        counter = ray.remote(resources={"b": 0.1}, num_cpus=0, max_restarts=1,
                             max_task_retries=0)(Counter).remote(str(log))
        assert ray.get(counter.inc.remote("warmup"), timeout=60) == ("warmup", 1)
        caller = Caller(counter.inc, "c", fence=fence_of(host)).start()
        stall(cluster.etcd_pid, 5.0, [caller])
        assert any(fenced for *_rest, fenced in caller.outcomes), \
            "no call was made while the host's fence was down"
        assert caller.errors() == []
        tags = [tag for tag, *_ in caller.outcomes]
        assert sorted(ran(log)) == sorted(["warmup"] + tags)   # each ran exactly once
    finally:
        cluster.shutdown()


def test_a_call_that_cannot_be_delivered_fails_saying_it_did_not_run(tmp_path, monkeypatch):
    """The actor's node is fenced (its lease lapsed in an etcd stall), so it
    refuses every call; past the delivery deadline the call fails, and the
    error says it was not executed -- which the actor's record confirms."""
    monkeypatch.setattr(actor_client, "DELIVERY_TIMEOUT_S", 2.0)
    cluster = Cluster(lease_ttl=2)
    try:
        cluster.add_node(num_cpus=1)
        host = cluster.add_node(num_cpus=1, resources={"b": 1})
        ray = cluster.connect()
        log = tmp_path / "ran"
        counter = ray.remote(resources={"b": 0.1}, num_cpus=0)(Counter).remote(str(log))
        assert ray.get(counter.inc.remote("warmup"), timeout=60) == ("warmup", 1)
        fence = fence_of(host)
        freeze(cluster.etcd_pid)
        try:
            wait_for(lambda: not fence.valid(), timeout=30, message="the host's fence lapses")
            with pytest.raises(ray.exceptions.ActorUnavailableError) as failure:
                ray.get(counter.inc.remote("refused"), timeout=60)
        finally:
            os.kill(cluster.etcd_pid, signal.SIGCONT)
        error = failure.value
        assert not error.delivered
        assert "was not executed" in str(error) and "never delivered" in str(error)
        assert "may or may not" not in str(error)
        assert "lease has lapsed" in str(error)          # and why it was refused
        # The refused call is never sent again: once the actor answers a new
        # call or is declared dead (its host lost the lease), it has not run.
        try:
            ray.get(counter.inc.remote("after"), timeout=60)
        except ray.exceptions.ActorDiedError:
            pass
        assert "refused" not in ran(log)
    finally:
        cluster.shutdown()
