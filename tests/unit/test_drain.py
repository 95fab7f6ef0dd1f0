"""The drain's decisions (node/drain.py) and the health answers (node/health.py),
fed plain values; the acting on real daemons is tests/integration/test_drain.py."""
from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from meshray.node import drain
from meshray.node.cluster_view import ClusterView
from meshray.node.health import health_routes, readiness
from meshray.node.http_api import HttpApi, Request
from meshray.scheduler import policy
from meshray.scheduler.resources import ResourceSet


# ---------------------------------------------------------------- timeout setting
def test_drain_timeout_prefers_the_flag_then_the_environment_then_25s():
    assert drain.drain_timeout(None, {}) == drain.DEFAULT_DRAIN_TIMEOUT_S == 25.0
    assert drain.drain_timeout(None, {drain.DRAIN_TIMEOUT_ENV: "7.5"}) == 7.5
    assert drain.drain_timeout(3, {drain.DRAIN_TIMEOUT_ENV: "7.5"}) == 3.0
    assert drain.drain_timeout(0, {}) == 0.0


@pytest.mark.parametrize("flag, env, named", [
    (-1, {}, "--drain-timeout=-1"),
    (float("nan"), {}, "--drain-timeout=nan"),
    (float("inf"), {}, "--drain-timeout=inf"),
    (None, {drain.DRAIN_TIMEOUT_ENV: "soon"}, "MESHRAY_DRAIN_TIMEOUT_S='soon'"),
    (None, {drain.DRAIN_TIMEOUT_ENV: "-3"}, "MESHRAY_DRAIN_TIMEOUT_S=-3.0"),
])
def test_a_bad_drain_timeout_is_refused_naming_where_it_came_from(flag, env, named):
    with pytest.raises(ValueError, match="seconds >= 0") as error:
        drain.drain_timeout(flag, env)
    assert named in str(error.value)


# ---------------------------------------------------------------- signals
def test_first_signal_drains_second_stops_later_ones_change_nothing():
    lifecycle = drain.NodeLifecycle()
    assert lifecycle.on_signal() == "drain" and lifecycle.state == "DRAINING"
    assert lifecycle.on_signal() == "stop" and lifecycle.state == "STOPPING"
    assert lifecycle.on_signal() == "ignore"
    assert lifecycle.drained() == "ignore"       # the drain ending after a hard stop


def test_a_node_that_does_not_drain_stops_at_the_first_signal():
    lifecycle = drain.NodeLifecycle()
    assert lifecycle.on_signal(drain=False) == "stop"
    assert lifecycle.on_signal(drain=False) == "ignore"


def test_a_finished_drain_stops_the_node_once():
    lifecycle = drain.NodeLifecycle()
    lifecycle.on_signal()
    assert lifecycle.drained() == "stop"
    assert lifecycle.on_signal() == "ignore"


# ---------------------------------------------------------------- progress
def test_drain_waits_for_running_and_queued_work_until_the_deadline():
    assert drain.drain_progress(1.0, 10.0, running=2, queued=0) == (
        False, "waiting for 2 running and 0 queued task(s)")
    assert drain.drain_progress(1.0, 10.0, running=0, queued=1)[0] is False
    done, why = drain.drain_progress(1.0, 10.0, running=0, queued=0)
    assert done and why.startswith("idle")
    done, why = drain.drain_progress(10.0, 10.0, running=1, queued=2)
    assert done and "deadline passed with 1 task(s) running and 2 queued" in why


def test_drain_progress_refuses_negative_counts():
    with pytest.raises(ValueError, match="running=-1"):
        drain.drain_progress(0.0, 1.0, running=-1, queued=0)


def test_drain_plan_carries_rays_names_and_a_wall_clock_deadline():
    plan = drain.DrainPlan.start(drain.REASON_PREEMPTION, "SIGTERM", 25.0,
                                 now=100.0, wall_now=1_000.0)
    assert plan.deadline == 125.0
    assert plan.record() == {"reason": "DRAIN_NODE_REASON_PREEMPTION",
                             "reason_message": "SIGTERM",
                             "deadline_timestamp_ms": 1_025_000}


# ---------------------------------------------------------------- peers' view
def test_a_draining_peer_is_a_member_but_no_candidate():
    me, peer = "aa" * 16, "bb" * 16
    view = ClusterView(me)
    record = {"Resources": {"CPU": 4.0}, "Labels": {}, "Address": "x",
              "Draining": {"reason": drain.REASON_PREEMPTION}}
    view.update({me: {}, peer: record}, {peer: {"CPU": 4.0}}, now=1.0)
    local = policy.NodeView(me, ResourceSet.from_dict({"CPU": 1.0}),
                            ResourceSet.from_dict({"CPU": 0.0}), True, {})
    views = view.node_views(local, 2.0)
    assert view.is_alive_member(peer) and views[peer].alive is False
    request = policy.SchedulingRequest(ResourceSet.from_dict({"CPU": 1.0}), "DEFAULT", {})
    assert policy.decide(request, views, me, 0).kind == "wait"     # not spilled there


# ---------------------------------------------------------------- health
@pytest.mark.parametrize("facts, expected", [
    ({}, (True, "")),
    ({"loop_ok": False}, (False, "event loop not answering")),
    ({"registered": False}, (False, "not registered in etcd")),
    ({"lease_valid": False}, (False, "etcd lease not confirmed")),
    ({"draining": True}, (False, "draining")),
])
def test_readiness_says_why_in_a_few_words(facts, expected):
    given = {"loop_ok": True, "registered": True, "lease_valid": True, "draining": False}
    assert readiness(**{**given, **facts}) == expected


@pytest.fixture
def health_api():
    """An HttpApi with the health routes over a fake daemon whose loop runs."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    fence = SimpleNamespace(valid=lambda: True)
    daemon = SimpleNamespace(config=SimpleNamespace(token="t" * 40),
                             drain=SimpleNamespace(draining=False),
                             membership=SimpleNamespace(registered=True), fence=fence)
    api = daemon.http = HttpApi(daemon)
    api._loop = loop
    api.add_routes(health_routes(daemon))
    yield api, daemon
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def _get(api, path):
    status, body, _headers = api.dispatch(Request(method="GET", path=path, query={},
                                                  headers={}, body=b""))
    return status, body


def test_health_routes_answer_without_the_token_and_say_nothing_more(health_api):
    api, daemon = health_api
    for path in ("/api/healthz", "/api/local_raylet_healthz", "/api/gcs_healthz"):
        assert _get(api, path) == (200, {"status": "success"})
    daemon.drain.draining = True
    assert _get(api, "/api/healthz") == (503, {"status": "failed", "reason": "draining"})
    assert _get(api, "/api/local_raylet_healthz") == (200, {"status": "success"})
    daemon.membership.registered = False
    assert _get(api, "/api/gcs_healthz") == (503, {"status": "failed",
                                                   "reason": "not registered in etcd"})
    # Everything else still needs the token.
    assert _get(api, "/api/jobs/")[0] == 401


def test_liveness_fails_when_the_loop_is_gone(health_api):
    api, daemon = health_api
    api._loop = None
    assert _get(api, "/api/local_raylet_healthz") == (
        503, {"status": "failed", "reason": "event loop not answering"})
    assert _get(api, "/api/healthz")[0] == 503
