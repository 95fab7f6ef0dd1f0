"""init/shutdown: startup, joining, errors, and leaving nothing behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.helpers import REPO, process_gone, run_driver, wait_for


def _meshray_children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_shutdown_leaves_no_process_segment_or_dir():
    code = """
import json, os, psutil, meshray as ray
ray.init(num_cpus=1)
@ray.remote
def f(): return os.getpid()
ray.get(f.remote())
from meshray.core.state import state
info = {"children": [p.pid for p in psutil.Process().children(recursive=True)],
        "store": state.core.store_dir, "session": state.core.session_dir}
ray.shutdown()
print(json.dumps(info))
"""
    result = run_driver(code)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(info["children"]) >= 3  # daemon, etcd, worker(s)
    for pid in info["children"]:
        assert process_gone(pid)
    assert not os.path.exists(info["store"])
    assert not os.path.exists(info["session"])


def test_shutdown_ends_every_thread_of_the_session_stream():
    # A daemon thread still inside the session stream when the interpreter
    # exits is frozen holding the stream's lock, and the stream's finalizer
    # then waits for that lock forever: the process prints everything and
    # never exits. shutdown() must leave no such thread behind.
    code = """
import gc, json, threading, grpc, meshray as ray
ray.init(num_cpus=1)
@ray.remote
def f(): return 1
@ray.remote
class A:
    def f(self): return 2
ray.get(f.remote())
assert ray.get(A.remote().f.remote()) == 2
from meshray.core.state import state
core = state.core
threads = [core._reader, core._sender] + [c._thread for c in core._actor_connections.values()]
ray.shutdown()
print(json.dumps({"alive": [t.name for t in threads if t is None or t.is_alive()],
                  "link_closed": core._link._sock.fileno() == -1,
                  # nor a stream left for the cyclic collector to finalize
                  "streams": [repr(o) for o in gc.get_objects() if isinstance(o, grpc.Call)],
                  "others": [t.name for t in threading.enumerate()
                             if t is not threading.main_thread()]}))
"""
    result = run_driver(code)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info == {"alive": [], "link_closed": True, "streams": [], "others": []}


def test_driver_killed_with_sigkill_leaves_nothing():
    code = """
import json, os, sys, time, psutil, meshray as ray
ray.init(num_cpus=1)
@ray.remote
def f(): return 1
ray.get(f.remote())
from meshray.core.state import state
print(json.dumps({"children": [p.pid for p in psutil.Process().children(recursive=True)],
                  "store": state.core.store_dir, "session": state.core.session_dir}), flush=True)
time.sleep(600)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        info = json.loads(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                             for p in info["children"]), timeout=20, message="children exit")
    wait_for(lambda: not os.path.exists(info["store"]), message="shared memory removed")
    wait_for(lambda: not os.path.exists(info["session"]), message="session dir removed")


def test_worker_output_reaches_driver_with_prefix():
    code = """
import meshray as ray
ray.init(num_cpus=1)
@ray.remote
def speak():
    print("hello from the task")
    return 1
ray.get(speak.remote())
import time; time.sleep(0.5)
ray.shutdown()
"""
    result = run_driver(code)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "hello from the task" in line]
    assert lines, result.stdout
    assert lines[0].startswith("(speak pid=")


def test_first_use_without_init_starts_a_cluster():
    # Tasks, actors and placement groups each connect on first use (Ray's
    # rule) through the hook the public API registers with core.state.
    code = """
import meshray as ray
from meshray.util.placement_group import placement_group

@ray.remote
def add_one(x):
    return x + 1

@ray.remote
class Seven:
    def value(self):
        return 7

assert not ray.is_initialized()
print("task", ray.get(add_one.remote(1)))
ray.shutdown()
assert not ray.is_initialized()
print("actor", ray.get(Seven.remote().value.remote()))
ray.shutdown()
assert not ray.is_initialized()
print("group", placement_group([{"CPU": 1}]).wait(60))
ray.shutdown()
"""
    result = run_driver(code, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["task", "2", "actor", "7", "group", "True"], result.stdout


def test_log_to_driver_false_silences_workers():
    code = """
import meshray as ray
ray.init(num_cpus=1, log_to_driver=False)
@ray.remote
def speak():
    print("should not appear")
    return 1
ray.get(speak.remote())
import time; time.sleep(0.5)
ray.shutdown()
"""
    result = run_driver(code)
    assert result.returncode == 0, result.stderr
    assert "should not appear" not in result.stdout


def test_unreachable_etcd_is_connection_error_quickly():
    import meshray
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="127.0.0.1:1"):
        meshray.init(address="127.0.0.1:1")
    assert time.monotonic() - start < 15
    assert not meshray.is_initialized()


def test_auto_without_cluster_is_connection_error(tmp_path, monkeypatch):
    import meshray
    monkeypatch.setenv("MESHRAY_RUN_DIR", str(tmp_path))
    with pytest.raises(ConnectionError, match="meshray start"):
        meshray.init(address="auto")


def test_init_twice_and_ignore_reinit_error():
    import meshray
    meshray.init(num_cpus=1)
    try:
        assert meshray.is_initialized()
        with pytest.raises(RuntimeError, match="ignore_reinit_error"):
            meshray.init()
        meshray.init(ignore_reinit_error=True)
    finally:
        meshray.shutdown()
    assert not meshray.is_initialized()


def test_bad_init_arguments_are_value_errors():
    import meshray
    with pytest.raises(ValueError, match="num_cpus"):
        meshray.init(num_cpus=-1)
    with pytest.raises(ValueError, match="num_cpus"):
        meshray.init(resources={"CPU": 2})
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        meshray.init(bogus=True)    # an unknown name: TypeError, as Python says it
    assert not meshray.is_initialized()


def test_unimportable_function_module_named_in_error(tmp_path):
    module = tmp_path / "only_on_driver_mod.py"
    module.write_text("def f():\n    return 1\n")
    code = f"""
import sys
sys.path.insert(0, {str(tmp_path)!r})
import meshray as ray
import only_on_driver_mod
ray.init(num_cpus=1)
g = ray.remote(only_on_driver_mod.f)
try:
    ray.get(g.remote())
except Exception as exc:
    print("ERROR:", type(exc).__name__, exc)
ray.shutdown()
"""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["PYTHONPATH"] = REPO
    result = run_driver(code, env=env)
    assert "only_on_driver_mod" in result.stdout, result.stdout + result.stderr
    assert "ERROR:" in result.stdout


def test_cli_start_status_stop(tmp_path):
    env = dict(os.environ, MESHRAY_RUN_DIR=str(tmp_path))
    meshray_cli = [sys.executable, "-m", "meshray.cli.main"]
    started = subprocess.run(meshray_cli + ["start", "--num-cpus", "1"], capture_output=True,
                             text=True, env=env, cwd=REPO, timeout=60)
    try:
        assert started.returncode == 0, started.stderr
        assert "meshray start --address" in started.stdout
        status = subprocess.run(meshray_cli + ["status"], capture_output=True, text=True,
                                env=env, cwd=REPO, timeout=60)
        assert status.returncode == 0, status.stderr
        assert "CPU 1/1" in status.stdout and "alive" in status.stdout
        driver = run_driver("import meshray as ray\nray.init(address='auto')\n"
                            "print('CPUS', ray.cluster_resources()['CPU'])\nray.shutdown()",
                            env=env)
        assert "CPUS 1.0" in driver.stdout, driver.stderr
    finally:
        stopped = subprocess.run(meshray_cli + ["stop"], capture_output=True, text=True,
                                 env=env, cwd=REPO, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped meshray node" in stopped.stdout
    assert not os.path.exists(os.path.join(tmp_path, "nodes")) or not os.listdir(
        os.path.join(tmp_path, "nodes"))


def test_killed_node_leftovers_are_removed_and_stale_stores_swept(tmp_path):
    from meshray.node.node_store import OWNER_FILE, sweep_stale_stores
    from meshray.testing import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        node = cluster.add_node(num_cpus=1)
        store = node._process.info["store_dir"]
        session = node._process.session_dir
        assert os.path.isdir(store) and os.path.isdir(session)
        cluster.remove_node(node, allow_graceful=False)
        assert not os.path.exists(store) and not os.path.exists(session)
    finally:
        cluster.shutdown()
    # A store dir whose owner died without cleaning up is swept by the next daemon.
    stale = tmp_path / "meshray-deadbeef0000"
    stale.mkdir()
    (stale / OWNER_FILE).write_text("999999999")
    foreign = tmp_path / "meshray-notours"
    foreign.mkdir()
    sweep_stale_stores(str(tmp_path))
    assert not stale.exists() and foreign.exists()
