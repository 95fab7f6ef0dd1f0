"""ray.util.ActorPool, as_completed and map_unordered on a real cluster.

Ordering is shown without timing: one value is held back by a gate actor
until the test opens it, after checking that the other value finished.
"""
from __future__ import annotations

import concurrent.futures

import pytest

from meshray.util import ActorPool, as_completed, map_unordered
from meshray.util.actor_pool import ActorPool as ActorPoolFromModule
from tests.helpers import wait_for


@pytest.fixture(scope="module")
def gate_classes(ray):
    @ray.remote
    class Gate:
        """Holds back callers until opened; records which values finished."""

        def __init__(self):
            import asyncio
            self.opened = asyncio.Event()
            self.finished = []

        async def wait_open(self):
            await self.opened.wait()

        async def open(self):
            self.opened.set()

        async def finish(self, value):
            self.finished.append(value)

        async def finished_values(self):
            return list(self.finished)

    @ray.remote
    class Worker:
        def __init__(self, gate):
            self.gate = gate

        def work(self, value):
            if value == 0:
                ray.get(self.gate.wait_open.remote())
            ray.get(self.gate.finish.remote(value))
            return value * 10

        def double(self, value):
            return 2 * value

    return Gate, Worker


def _finished(ray, gate):
    return ray.get(gate.finished_values.remote())


def test_module_and_package_export_the_same_class():
    assert ActorPool is ActorPoolFromModule


def test_map_keeps_submission_order_when_a_later_value_finishes_first(ray, gate_classes):
    Gate, Worker = gate_classes
    gate = Gate.remote()
    pool = ActorPool([Worker.remote(gate), Worker.remote(gate)])
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        results = executor.submit(lambda: list(pool.map(lambda a, v: a.work.remote(v), [0, 1])))
        wait_for(lambda: _finished(ray, gate) == [1], message="value 1 finished")
        ray.get(gate.open.remote())
        assert results.result(timeout=60) == [0, 10]


def test_map_unordered_yields_the_value_that_finished_first(ray, gate_classes):
    Gate, Worker = gate_classes
    gate = Gate.remote()
    pool = ActorPool([Worker.remote(gate), Worker.remote(gate)])
    results = pool.map_unordered(lambda a, v: a.work.remote(v), [0, 1])
    assert next(results) == 10          # value 0 is still held back
    ray.get(gate.open.remote())
    assert list(results) == [0]


def test_get_next_times_out_on_the_oldest_and_can_drop_it(ray, gate_classes):
    Gate, Worker = gate_classes
    gate = Gate.remote()
    pool = ActorPool([Worker.remote(gate), Worker.remote(gate)])
    pool.submit(lambda a, v: a.work.remote(v), 0)
    pool.submit(lambda a, v: a.work.remote(v), 1)
    wait_for(lambda: _finished(ray, gate) == [1], message="value 1 finished")
    with pytest.raises(TimeoutError, match="Timed out waiting for result"):
        pool.get_next(timeout=0.05)          # value 1 is done, but value 0 comes first
    assert pool.has_next()
    with pytest.raises(TimeoutError, match="has been ignored"):
        pool.get_next(timeout=0.05, ignore_if_timedout=True)
    assert pool.get_next() == 10          # value 0 was dropped
    assert not pool.has_next()
    with pytest.raises(StopIteration):
        pool.get_next()
    with pytest.raises(StopIteration):
        pool.get_next_unordered()
    ray.get(gate.open.remote())


def test_submissions_wait_for_a_free_actor_and_pool_membership(ray, gate_classes):
    _, Worker = gate_classes
    first, second = Worker.remote(None), Worker.remote(None)
    pool = ActorPool([first])
    assert pool.has_free()
    for value in range(3):
        pool.submit(lambda a, v: a.double.remote(v), value)
    assert not pool.has_free() and pool.pop_idle() is None
    with pytest.raises(ValueError, match="already belongs"):
        pool.push(first)
    pool.push(second)                     # picks up a waiting submission
    assert sorted(pool.get_next_unordered() for _ in range(3)) == [0, 2, 4]
    assert pool.has_free()
    assert pool.pop_idle() in (first, second)
    assert list(pool.map(lambda a, v: a.double.remote(v), [1, 2, 3, 4])) == [2, 4, 6, 8]


def test_fn_must_return_an_object_ref(ray, gate_classes):
    _, Worker = gate_classes
    pool = ActorPool([Worker.remote(None)])
    with pytest.raises(TypeError, match="must return the ObjectRef"):
        pool.submit(lambda a, v: v, 1)
    assert pool.has_free()


def test_as_completed_yields_finished_values_before_held_ones(ray, gate_classes):
    Gate, _ = gate_classes
    gate = Gate.remote()

    @ray.remote
    def held(value, gate):
        if value == 0:
            ray.get(gate.wait_open.remote())
        return value

    refs = [held.remote(v, gate) for v in range(4)]
    results = as_completed(refs, chunk_size=1)
    assert sorted(next(results) for _ in range(3)) == [1, 2, 3]
    ray.get(gate.open.remote())
    assert list(results) == [0]
    assert list(as_completed([held.remote(5, None)], yield_obj_refs=True))[0].__class__ \
        is ray.ObjectRef
    with pytest.raises(ValueError, match="chunk_size"):
        as_completed(refs, chunk_size=0)


def test_map_unordered_applies_fn_to_every_item_with_backpressure(ray):
    @ray.remote
    def square(x):
        return x * x

    out = list(map_unordered(square, iter(range(12)), backpressure_size=3, chunk_size=2))
    assert sorted(out) == [x * x for x in range(12)]
    with pytest.raises(TypeError, match="remote function"):
        map_unordered(lambda x: x, [1])
    with pytest.raises(ValueError, match="backpressure_size"):
        map_unordered(square, [1], backpressure_size=0)
