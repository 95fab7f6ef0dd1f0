"""Actors end to end: real etcd, a real node daemon, real actor processes."""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

from tests.helpers import run_driver, wait_for


pytestmark = pytest.mark.meshray_init(num_cpus=4, resources={"slot": 2})


def test_actor_keeps_state_and_orders_calls(ray):
    @ray.remote
    class Counter:
        def __init__(self, start):
            self.value = start
            self.seen = []

        def add(self, k):
            self.seen.append(k)
            self.value += k
            return self.value

        def history(self):
            return self.seen

    counter = Counter.remote(100)
    refs = [counter.add.remote(i) for i in range(50)]
    assert ray.get(refs)[-1] == 100 + sum(range(50))
    assert ray.get(counter.history.remote()) == list(range(50))


def test_actor_class_cannot_be_instantiated_directly(ray):
    @ray.remote
    class A:
        pass

    with pytest.raises(TypeError, match=r"A.remote\(\)"):
        A()


def test_unknown_method_is_attribute_error_naming_class(ray):
    @ray.remote
    class Named:
        def real(self):
            return 1

    handle = Named.remote()
    with pytest.raises(AttributeError, match="Named"):
        handle.missing.remote()


def test_num_returns_per_method_and_per_call(ray):
    @ray.remote
    class Splitter:
        @ray.method(num_returns=2)
        def pair(self):
            return "a", "b"

        def triple(self):
            return 1, 2, 3

    s = Splitter.remote()
    a, b = s.pair.remote()
    assert ray.get([a, b]) == ["a", "b"]
    x, y, z = s.triple.options(num_returns=3).remote()
    assert ray.get([x, y, z]) == [1, 2, 3]


def test_handles_pass_to_tasks_and_actors(ray):
    @ray.remote
    class Store:
        def __init__(self):
            self.items = []

        def push(self, item):
            self.items.append(item)
            return len(self.items)

        def all(self):
            return self.items

    @ray.remote
    def pusher(store, item):
        return ray.get(store.push.remote(item))

    @ray.remote
    class Forwarder:
        def forward(self, store, item):
            return ray.get(store.push.remote(item))

    store = Store.remote()
    ray.get(pusher.remote(store, "from-task"))
    forwarder = Forwarder.remote()
    ray.get(forwarder.forward.remote(store, "from-actor"))
    assert sorted(ray.get(store.all.remote())) == ["from-actor", "from-task"]


def test_actor_results_flow_into_tasks(ray):
    @ray.remote
    class Source:
        def value(self):
            return 21

    @ray.remote
    def double(x):
        return 2 * x

    source = Source.remote()
    assert ray.get(double.remote(source.value.remote())) == 42
    assert ray.get(double.remote(ray.get(source.value.remote()))) == 42


def test_default_actor_holds_no_cpu_explicit_holds(ray):
    @ray.remote
    class Idle:
        def ping(self):
            return "pong"

    @ray.remote(num_cpus=1)
    class Busy:
        def ping(self):
            return "pong"

    before = ray.available_resources().get("CPU", 0)
    idle = [Idle.remote() for _ in range(3)]
    assert ray.get([a.ping.remote() for a in idle]) == ["pong"] * 3
    assert wait_for(lambda: ray.available_resources().get("CPU", 0) == before)
    busy = Busy.remote()
    assert ray.get(busy.ping.remote()) == "pong"
    assert wait_for(lambda: ray.available_resources().get("CPU", 0) == before - 1)
    ray.kill(busy)
    assert wait_for(lambda: ray.available_resources().get("CPU", 0) == before)


def test_custom_resources_held_for_lifetime(ray):
    @ray.remote(resources={"slot": 1}, num_cpus=0)
    class Slotted:
        def ping(self):
            return 1

    a = Slotted.remote()
    b = Slotted.remote()
    assert ray.get([a.ping.remote(), b.ping.remote()]) == [1, 1]
    c = Slotted.remote()
    ready, _ = ray.wait([c.ping.remote()], timeout=1.0)
    assert ready == []  # no slot left until one actor dies
    ray.kill(a)
    assert ray.get(c.ping.remote(), timeout=30) == 1


def test_threaded_actor_runs_calls_concurrently(ray):
    @ray.remote(max_concurrency=3)
    class Gate:
        def __init__(self):
            self.barrier = threading.Barrier(3, timeout=20)

        def meet(self):
            self.barrier.wait()
            return threading.get_ident()

    gate = Gate.remote()
    idents = ray.get([gate.meet.remote() for _ in range(3)], timeout=30)
    assert len(set(idents)) == 3


def test_async_actor_concurrency_and_awaiting_refs(ray):
    @ray.remote
    class AsyncWorker:
        def __init__(self):
            self.event = asyncio.Event()
            self.count = 0

        async def wait_for_release(self):
            self.count += 1
            await self.event.wait()
            return "released"

        async def release(self):
            self.event.set()
            return self.count

        async def await_ref(self, refs):
            return await refs[0]

    worker = AsyncWorker.remote()
    waiting = [worker.wait_for_release.remote() for _ in range(5)]
    # All five are suspended at once (an async actor is concurrent by default).
    wait_for(lambda: ray.get(worker.release.remote()) >= 5, timeout=20)
    assert ray.get(waiting, timeout=20) == ["released"] * 5
    inner = ray.put("through await")
    assert ray.get(worker.await_ref.remote([inner])) == "through await"


def test_concurrency_groups(ray):
    @ray.remote(concurrency_groups={"io": 2})
    class Grouped:
        def __init__(self):
            self.barrier = threading.Barrier(2, timeout=20)

        @ray.method(concurrency_group="io")
        def io_call(self):
            self.barrier.wait()
            return "io"

        def plain(self):
            return "plain"

    grouped = Grouped.remote()
    assert ray.get([grouped.io_call.remote(), grouped.io_call.remote()], timeout=30) == ["io", "io"]
    assert ray.get(grouped.plain.remote()) == "plain"


def test_named_actor_unique_get_actor_and_get_if_exists(ray):
    @ray.remote
    class Registry:
        def who(self):
            return ray.get_runtime_context().get_actor_id()

    first = Registry.options(name="registry", namespace="ns-a").remote()
    actor_id = ray.get(first.who.remote())
    with pytest.raises(ValueError):
        Registry.options(name="registry", namespace="ns-a").remote()
    other_ns = Registry.options(name="registry", namespace="ns-b").remote()
    assert ray.get(other_ns.who.remote()) != actor_id
    same = Registry.options(name="registry", namespace="ns-a", get_if_exists=True).remote()
    assert ray.get(same.who.remote()) == actor_id
    looked_up = ray.get_actor("registry", namespace="ns-a")
    assert ray.get(looked_up.who.remote()) == actor_id
    with pytest.raises(ValueError):
        ray.get_actor("no-such-actor", namespace="ns-a")


def test_kill_makes_later_calls_raise_actor_died(ray):
    @ray.remote
    class Victim:
        def ping(self):
            return 1

    victim = Victim.remote()
    assert ray.get(victim.ping.remote()) == 1
    ray.kill(victim)
    with pytest.raises(ray.exceptions.ActorDiedError):
        ray.get(victim.ping.remote(), timeout=30)


def test_graceful_terminate_finishes_queued_calls(ray):
    @ray.remote
    class Slow:
        def work(self, i):
            time.sleep(0.05)
            return i

    slow = Slow.remote()
    refs = [slow.work.remote(i) for i in range(5)]
    slow.__ray_terminate__.remote()
    assert ray.get(refs, timeout=30) == list(range(5))
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(slow.work.remote(99), timeout=30)


def test_exit_actor_inside_method(ray):
    @ray.remote(max_restarts=2)
    class Quitter:
        def quit(self):
            ray.actor.exit_actor()

        def ping(self):
            return 1

    quitter = Quitter.remote()
    assert ray.get(quitter.ping.remote()) == 1
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(quitter.quit.remote(), timeout=30)
    with pytest.raises(ray.exceptions.ActorDiedError):
        ray.get(quitter.ping.remote(), timeout=30)  # not restarted: the exit was intended


def test_constructor_error_makes_calls_raise_with_traceback(ray):
    @ray.remote
    class Broken:
        def __init__(self):
            raise ValueError("bad constructor argument")

        def ping(self):
            return 1

    broken = Broken.remote()
    with pytest.raises(ray.exceptions.ActorDiedError) as info:
        ray.get(broken.ping.remote(), timeout=30)
    assert "bad constructor argument" in str(info.value)


def test_restart_reruns_init_and_reports_reconstruction(ray):
    @ray.remote(max_restarts=1, max_task_retries=-1)
    class Phoenix:
        def __init__(self):
            self.calls = 0

        def pid(self):
            return os.getpid()

        def state(self):
            self.calls += 1
            return self.calls, ray.get_runtime_context().was_current_actor_reconstructed

    phoenix = Phoenix.remote()
    assert ray.get(phoenix.state.remote()) == (1, False)
    os.kill(ray.get(phoenix.pid.remote()), signal.SIGKILL)
    assert ray.get(phoenix.state.remote(), timeout=60) == (1, True)
    os.kill(ray.get(phoenix.pid.remote()), signal.SIGKILL)
    with pytest.raises(ray.exceptions.ActorDiedError):
        ray.get(phoenix.state.remote(), timeout=60)  # max_restarts=1 used up


def test_at_most_once_by_default_in_flight_call_fails(ray, tmp_path):
    marker = tmp_path / "started"

    @ray.remote(max_restarts=1)
    class Once:
        def block(self, path):
            open(path, "w").write("x")
            time.sleep(60)

        def pid(self):
            return os.getpid()

    once = Once.remote()
    pid = ray.get(once.pid.remote())
    ref = once.block.remote(str(marker))
    wait_for(marker.exists, message="call started")
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(ref, timeout=60)
    assert ray.get(once.pid.remote(), timeout=60) != pid  # restarted, usable again


def test_max_pending_calls(ray):
    @ray.remote(max_pending_calls=2)
    class Limited:
        def wait(self):
            time.sleep(2)

    limited = Limited.remote()
    first = [limited.wait.remote(), limited.wait.remote()]
    with pytest.raises(ray.exceptions.PendingCallsLimitExceeded):
        limited.wait.remote()
    ray.get(first, timeout=30)


def test_runtime_context_actor_id(ray):
    @ray.remote
    class Who:
        def me(self):
            return ray.get_runtime_context().get_actor_id()

    who = Who.remote()
    assert len(ray.get(who.me.remote())) == 32
    assert ray.get_runtime_context().get_actor_id() is None


def test_actor_dies_with_driver_detached_survives(tmp_path):
    code = """
import os, meshray as ray
ray.init(address="auto")
@ray.remote
class Pid:
    def pid(self): return os.getpid()
owned = Pid.remote()
detached = Pid.options(name="survivor", lifetime="detached", namespace="life").remote()
print(ray.get(owned.pid.remote()), ray.get(detached.pid.remote()), flush=True)
os.kill(os.getpid(), 9)
"""
    import subprocess
    import sys

    import psutil
    from tests.helpers import REPO
    env = dict(os.environ)
    # A run dir of its own: `meshray stop` below stops every node recorded there.
    env["MESHRAY_RUN_DIR"] = str(tmp_path / "run")
    started = subprocess.run([sys.executable, "-m", "meshray.cli.main", "start", "--num-cpus", "2"],
                             capture_output=True, text=True, cwd=REPO, timeout=60, env=env)
    assert started.returncode == 0, started.stderr
    try:
        result = run_driver(code, env=env)
        owned_pid, detached_pid = map(int, result.stdout.split())
        wait_for(lambda: not psutil.pid_exists(owned_pid), timeout=20,
                 message="owned actor dies with its SIGKILLed driver")
        assert psutil.pid_exists(detached_pid)
        check = run_driver("import meshray as ray\nray.init(address='auto')\n"
                           "a = ray.get_actor('survivor', namespace='life')\n"
                           "print(ray.get(a.pid.remote()))\nray.kill(a)\nray.shutdown()", env=env)
        assert check.stdout.strip() == str(detached_pid), check.stderr
        listing = subprocess.run([sys.executable, "-m", "meshray.cli.main", "list", "actors"],
                                 capture_output=True, text=True, cwd=REPO, timeout=60, env=env)
        assert listing.returncode == 0, listing.stderr
        survivor_line = next(line for line in listing.stdout.splitlines() if "life/survivor" in line)
        assert "DEAD" in survivor_line and "meshray.kill()" in survivor_line
        assert any("DEAD" in line and "owner" in line for line in listing.stdout.splitlines())
    finally:
        subprocess.run([sys.executable, "-m", "meshray.cli.main", "stop"], capture_output=True,
                       cwd=REPO, timeout=60, env=env)


def test_actor_returns_large_values_and_nested_refs(ray):
    import gc

    import numpy as np

    from meshray.core.state import state

    @ray.remote
    class Producer:
        def big(self):
            return np.arange(400_000)

        def nested(self):
            return [ray.put("inside")]

    producer = Producer.remote()
    big_ref = producer.big.remote()
    array = ray.get(big_ref)
    assert array[-1] == 399_999 and not array.flags.writeable
    name = big_ref.hex()
    assert name in os.listdir(state.core.store_dir)
    del array, big_ref
    gc.collect()
    wait_for(lambda: name not in os.listdir(state.core.store_dir), message="actor return freed")
    outer = ray.get(producer.nested.remote())
    assert ray.get(outer[0]) == "inside"
