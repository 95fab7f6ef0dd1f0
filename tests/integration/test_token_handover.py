"""The cluster token never sits in the environment of a node daemon or worker.

A worker runs user code; an environment is inherited by everything that code
starts and shows up in /proc/<pid>/environ. The daemons and workers here get
the token on a pipe (see meshray.security.process_token). The driver's own
environment deliberately names the token both ways (MESHRAY_TOKEN and
MESHRAY_TOKEN_FILE, as after `export MESHRAY_TOKEN=...`), so the test also
shows that meshray does not pass the caller's variables on.

Every kind of process that authenticates is covered, on two nodes: plain
tasks, nested tasks, actors, and an actor calling an actor on the other node
-- each call succeeding is the proof that the token did arrive.
"""
from __future__ import annotations

import os
import sys

import cloudpickle
import pytest

from meshray import security

pytestmark = pytest.mark.timeout(180)

# Workers do not have this test module on their path: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def leak_report(token: str) -> dict:
    """What this process could find of `token` in its environment (runs in workers)."""
    import os as _os
    import subprocess as _subprocess

    from meshray import security as _security

    with open("/proc/self/environ", "rb") as handle:
        initial = handle.read()
    child = _subprocess.run(["env"], capture_output=True, timeout=30).stdout
    return {
        "pid": _os.getpid(),
        "variables": sorted(k for k in _os.environ
                            if k in (_security.TOKEN_ENV, _security.TOKEN_FILE_ENV)),
        "value_in_environ": any(token in value for value in _os.environ.values()),
        "initial_environ": token.encode() in initial
                           or b"MESHRAY_TOKEN=" in initial or b"MESHRAY_TOKEN_FILE=" in initial,
        "child_environ": token.encode() in child or b"MESHRAY_TOKEN=" in child,
    }


CLEAN = {"variables": [], "value_in_environ": False, "initial_environ": False,
         "child_environ": False}


def _clean(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "pid"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from meshray.testing import Cluster

    saved = {name: os.environ.get(name) for name in (security.TOKEN_ENV, security.TOKEN_FILE_ENV)}
    cluster = Cluster(shutdown_at_exit=False)
    token_file = tmp_path_factory.mktemp("token") / "token"
    security.write_token_file(token_file, cluster.token)
    os.environ[security.TOKEN_ENV] = cluster.token
    os.environ[security.TOKEN_FILE_ENV] = str(token_file)
    try:
        cluster.add_node(num_cpus=1, resources={"node_a": 2}, wait=False)
        cluster.add_node(num_cpus=1, resources={"node_b": 2}, wait=False)
        cluster.wait_for_nodes()
        ray = cluster.connect()
        yield ray, cluster
        ray.shutdown()
    finally:
        cluster.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def test_daemons_environment_holds_no_token(cluster):
    _ray, cluster = cluster
    nodes = cluster.list_all_nodes()
    assert len(nodes) == 2
    for node in nodes:
        with open(f"/proc/{node.pid}/environ", "rb") as handle:
            initial = handle.read()
        assert cluster.token.encode() not in initial
        assert b"MESHRAY_TOKEN=" not in initial and b"MESHRAY_TOKEN_FILE=" not in initial


def test_tasks_and_nested_tasks_find_no_token(cluster):
    ray, cluster = cluster
    token = cluster.token
    report = ray.remote(leak_report)

    @ray.remote(resources={"node_a": 1})
    def outer(token):
        # A task submitting a task to the other node: needs the token itself.
        inner = report.options(resources={"node_b": 1}).remote(token)
        return leak_report(token), ray.get(inner, timeout=60)

    first = ray.get(report.options(resources={"node_a": 1}).remote(token), timeout=60)
    second = ray.get(report.options(resources={"node_b": 1}).remote(token), timeout=60)
    nested_outer, nested_inner = ray.get(outer.remote(token), timeout=90)
    for result in (first, second, nested_outer, nested_inner):
        assert _clean(result) == CLEAN
    assert first["pid"] != second["pid"]


def test_actors_and_actor_to_actor_calls_find_no_token(cluster):
    ray, cluster = cluster
    token = cluster.token

    @ray.remote(num_cpus=0)
    class Probe:
        def report(self, token):
            return leak_report(token)

        def ask(self, other, token):
            # Actor-to-actor across nodes: this worker dials the other actor's server.
            return ray.get(other.report.remote(token), timeout=60)

    a = Probe.options(resources={"node_a": 1}).remote()
    b = Probe.options(resources={"node_b": 1}).remote()
    here = ray.get(a.report.remote(token), timeout=60)
    there = ray.get(a.ask.remote(b, token), timeout=60)
    back = ray.get(b.ask.remote(a, token), timeout=60)
    assert _clean(here) == _clean(there) == _clean(back) == CLEAN
    assert here["pid"] == back["pid"] != there["pid"]
    ray.kill(a)
    ray.kill(b)
