"""ray.util's runtime helpers on a real cluster: named-actor listing, the
node's IP, serializability inspection and custom serializers."""
from __future__ import annotations

import io
import threading

import pytest

from meshray.util import (
    deregister_serializer,
    get_node_ip_address,
    inspect_serializability,
    list_named_actors,
    register_serializer,
)
from tests.helpers import wait_for


def test_list_named_actors_in_this_namespace_and_all(ray):
    @ray.remote
    class Named:
        def ping(self):
            return True

    namespace = ray.get_runtime_context().namespace
    here = Named.options(name="util-here").remote()
    there = Named.options(name="util-there", namespace="util-other").remote()
    Named.remote()                                   # unnamed: never listed
    assert ray.get([here.ping.remote(), there.ping.remote()]) == [True, True]

    wait_for(lambda: "util-here" in list_named_actors(), message="named actor listed")
    assert "util-there" not in list_named_actors()
    everywhere = wait_for(
        lambda: (lambda found: found if {"name": "util-there", "namespace": "util-other"}
                 in found else None)(list_named_actors(all_namespaces=True)),
        message="actor in the other namespace listed")
    assert {"name": "util-here", "namespace": namespace} in everywhere
    assert all(set(entry) == {"name", "namespace"} for entry in everywhere)

    ray.kill(here)
    wait_for(lambda: "util-here" not in list_named_actors(), message="killed actor unlisted")
    with pytest.raises(TypeError, match="all_namespaces"):
        list_named_actors(all_namespaces="yes")


def test_list_named_actors_from_a_task(ray):
    @ray.remote
    class Named:
        def ping(self):
            return True

    actor = Named.options(name="util-from-task").remote()
    ray.get(actor.ping.remote())

    @ray.remote
    def listing():
        from meshray.util import list_named_actors as listed
        return listed()

    wait_for(lambda: "util-from-task" in ray.get(listing.remote()),
             message="a task sees the job's named actor")


def test_get_node_ip_address_is_the_nodes_address(ray):
    node_hosts = {node["NodeManagerAddress"] for node in ray.nodes()}
    assert get_node_ip_address() in node_hosts

    @ray.remote
    def ip_in_task():
        from meshray.util import get_node_ip_address as ip
        return ip()

    assert ray.get(ip_in_task.remote()) in node_hosts


class _HoldsLock:
    def __init__(self):
        self.value = 7
        self.lock = threading.Lock()


def test_inspect_serializability_names_the_unpicklable_member(ray):
    report = io.StringIO()
    ok, failures = inspect_serializability(_HoldsLock(), name="holder", print_file=report)
    assert not ok
    assert [failure.name for failure in failures] == ["lock"]
    (failure,) = failures
    assert isinstance(failure.parent, _HoldsLock)
    assert "lock" in report.getvalue()

    lock = threading.Lock()

    def uses_lock():
        return lock

    ok, failures = inspect_serializability(uses_lock, print_file=io.StringIO())
    assert not ok and {failure.name for failure in failures} == {"lock"}
    assert inspect_serializability([1, "two"], print_file=io.StringIO()) == (True, set())


def test_registered_serializer_is_used_for_arguments_and_results(ray):
    class Point:
        def __init__(self, x):
            self.x = x
            self.lock = threading.Lock()         # plain pickling fails on this
            self.rebuilt = False

    def to_plain(point):
        return {"x": point.x}

    def from_plain(data):
        point = Point(data["x"])
        point.rebuilt = True
        return point

    @ray.remote
    def inspect_point(point):
        return point.x, point.rebuilt

    with pytest.raises(TypeError, match="could not serialize"):
        inspect_point.remote(Point(1))

    register_serializer(Point, serializer=to_plain, deserializer=from_plain)
    try:
        assert ray.get(inspect_point.remote(Point(3))) == (3, True)
        assert ray.get(ray.put(Point(4))).rebuilt is True

        @ray.remote
        def make_point(register):
            # Registrations are per process: a worker registers for its results.
            if register:
                from meshray.util import register_serializer as reg
                reg(Point, serializer=to_plain, deserializer=from_plain)
            return Point(5)

        with pytest.raises(TypeError, match="could not serialize"):
            ray.get(make_point.remote(False))
        point = ray.get(make_point.remote(True))
        assert (point.x, point.rebuilt) == (5, True)
    finally:
        deregister_serializer(Point)
    deregister_serializer(Point)                 # no serializer: nothing happens
    with pytest.raises(TypeError, match="could not serialize"):
        inspect_point.remote(Point(1))
    with pytest.raises(TypeError, match="cls"):
        register_serializer("Point", serializer=to_plain, deserializer=from_plain)
    with pytest.raises(TypeError, match="deserializer"):
        register_serializer(Point, serializer=to_plain, deserializer=None)
