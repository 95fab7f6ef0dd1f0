"""Generators on actors, wait() over generators, and num_returns="dynamic", as in Ray.

A producer blocks on a gate actor before its third item, so a consumer that
sees items 1 and 2 before opening the gate proves they were streamed rather
than delivered when the call ended. Every blocking step has a deadline:
`wait([gen], timeout=...)` says whether the next item came.
"""
from __future__ import annotations

import asyncio
import time

import pytest

CALL_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def gate_class(ray):
    @ray.remote
    class Gate:
        """Named events: `passed` blocks until `open` is called with the name."""

        def __init__(self):
            self.events = {}

        def _event(self, name):
            return self.events.setdefault(name, asyncio.Event())

        async def passed(self, name):
            await self._event(name).wait()
            return name

        async def open(self, name):
            self._event(name).set()

    return Gate


def _gated_items(ray):
    """A new sync generator method: 1, 2, then 3 once the gate opens."""
    def items(self, gate):
        yield 1
        yield 2
        ray.get(gate.passed.remote("third"))
        yield 3
    return items


def _producers(ray):
    """A producer class per actor kind; `items(gate)` yields 1, 2, then 3 once the gate opens."""

    @ray.remote
    class Plain:
        items = _gated_items(ray)

    @ray.remote(max_concurrency=2)
    class Threaded:
        items = _gated_items(ray)

    @ray.remote(concurrency_groups={"io": 2})
    class Grouped:
        items = ray.method(concurrency_group="io")(_gated_items(ray))

    @ray.remote
    class Async:
        async def items(self, gate):
            yield 1
            yield 2
            await gate.passed.remote("third")
            yield 3

    return {"plain": Plain, "threaded": Threaded, "group": Grouped, "async": Async}


def _next_within(ray, generator, timeout=CALL_TIMEOUT_S):
    """next(generator), failing the test if its item does not come in time."""
    ready, _ = ray.wait([generator], timeout=timeout)
    assert ready == [generator], f"no next item from {generator} within {timeout}s"
    return next(generator)


def _consume_gated(ray, gate, generator):
    assert ray.get(_next_within(ray, generator)) == 1
    assert ray.get(_next_within(ray, generator)) == 2
    # Items 1 and 2 arrived while the producer waits at the gate for item 3.
    ready, _ = ray.wait([generator], timeout=0)
    assert ready == []
    ray.get(gate.open.remote("third"))
    assert ray.get(_next_within(ray, generator)) == 3
    assert ray.wait([generator], timeout=CALL_TIMEOUT_S)[0] == [generator]    # finished
    with pytest.raises(StopIteration):
        next(generator)


@pytest.mark.parametrize("kind", ["plain", "threaded", "group", "async"])
def test_each_actor_kind_streams_items_before_it_finishes(ray, gate_class, kind):
    producer = _producers(ray)[kind].remote()
    gate = gate_class.remote()
    generator = producer.items.remote(gate)     # a generator method streams by default
    assert isinstance(generator, ray.ObjectRefGenerator)
    _consume_gated(ray, gate, generator)


def test_streaming_from_method_decorator_and_options(ray):
    @ray.remote
    class Counter:
        @ray.method(num_returns="streaming")
        def up(self, n):
            for i in range(n):
                yield i

        def down(self, n):
            for i in reversed(range(n)):
                yield i

    counter = Counter.remote()
    assert [ray.get(ref) for ref in counter.up.remote(3)] == [0, 1, 2]
    generator = counter.down.options(num_returns="streaming").remote(3)
    assert isinstance(generator, ray.ObjectRefGenerator)
    assert [ray.get(ref) for ref in generator] == [2, 1, 0]
    # A fixed num_returns on a generator method: one return per item yielded.
    first, second = counter.up.options(num_returns=2).remote(2)
    assert ray.get([first, second], timeout=CALL_TIMEOUT_S) == [0, 1]


@pytest.mark.parametrize("is_async", [False, True])
def test_exception_mid_stream_comes_after_the_items_before_it(ray, is_async):
    if is_async:
        @ray.remote
        class Failing:
            async def items(self):
                yield "a"
                yield "b"
                raise ValueError("broke after b")
    else:
        @ray.remote
        class Failing:
            def items(self):
                yield "a"
                yield "b"
                raise ValueError("broke after b")

    actor = Failing.remote()
    generator = actor.items.remote()
    assert ray.get(_next_within(ray, generator)) == "a"
    assert ray.get(_next_within(ray, generator)) == "b"
    with pytest.raises(ValueError, match="broke after b"):
        ray.get(_next_within(ray, generator))
    with pytest.raises(StopIteration):
        next(generator)


def _drain_until_error(ray, generator):
    """Values taken from `generator` until a ref raises; (values, the error)."""
    values = []
    deadline = time.monotonic() + CALL_TIMEOUT_S
    while time.monotonic() < deadline:
        ref = _next_within(ray, generator)
        try:
            values.append(ray.get(ref, timeout=CALL_TIMEOUT_S))
        except ray.exceptions.RayError as error:
            with pytest.raises(StopIteration):
                next(generator)
            return values, error
    raise AssertionError(f"the stream did not end within {CALL_TIMEOUT_S}s")


@pytest.mark.parametrize("is_async", [False, True])
def test_cancel_mid_stream_ends_it_with_task_cancelled_error(ray, gate_class, is_async):
    if is_async:
        @ray.remote
        class Ticker:
            def __init__(self):
                self.stopped = False

            async def ticks(self):
                try:
                    i = 0
                    while True:
                        yield i
                        i += 1
                        await asyncio.sleep(0.02)
                finally:
                    self.stopped = True

            async def was_stopped(self):
                return self.stopped
    else:
        @ray.remote
        class Ticker:
            def __init__(self):
                self.stopped = False

            def ticks(self):
                try:
                    i = 0
                    while True:
                        yield i
                        i += 1
                        time.sleep(0.02)
                finally:
                    self.stopped = True

            def was_stopped(self):
                return self.stopped

    ticker = Ticker.remote()
    generator = ticker.ticks.remote()
    assert ray.get(_next_within(ray, generator)) == 0
    ray.cancel(generator)
    values, error = _drain_until_error(ray, generator)
    assert isinstance(error, ray.exceptions.TaskCancelledError)
    assert values == list(range(1, len(values) + 1))      # in order, none lost before the end
    # The generator was stopped (its finally ran), and the actor lives on.
    assert ray.get(ticker.was_stopped.remote(), timeout=CALL_TIMEOUT_S) is True


def test_actor_death_mid_stream_ends_it_with_actor_died_error(ray, gate_class):
    @ray.remote
    class Doomed:
        def items(self, gate):
            yield "first"
            ray.get(gate.passed.remote("never"))
            yield "unreachable"

    doomed = Doomed.remote()
    gate = gate_class.remote()
    generator = doomed.items.remote(gate)
    assert ray.get(_next_within(ray, generator)) == "first"
    ray.kill(doomed)
    values, error = _drain_until_error(ray, generator)
    assert values == []
    assert isinstance(error, ray.exceptions.ActorDiedError)


def test_wait_over_generators_and_refs(ray, gate_class):
    @ray.remote
    class Producer:
        def items(self, gate):
            ray.get(gate.passed.remote("go"))
            yield "item"

        def value(self):
            return "plain"

    producer = Producer.options(max_concurrency=4).remote()
    gate = gate_class.remote()
    generator = producer.items.remote(gate)
    plain = producer.value.remote()
    assert ray.get(plain, timeout=CALL_TIMEOUT_S) == "plain"
    ready, not_ready = ray.wait([generator, plain], num_returns=2, timeout=0)
    assert ready == [plain] and not_ready == [generator]
    ray.get(gate.open.remote("go"))
    ready, not_ready = ray.wait([generator, plain], num_returns=2, timeout=CALL_TIMEOUT_S)
    assert ready == [generator, plain] and not_ready == []
    assert ray.get(next(generator)) == "item"
    # Finished (its next() would stop at once): ready too, as Ray documents.
    ray.get(generator.completed(), timeout=CALL_TIMEOUT_S)
    assert ray.wait([generator], timeout=0) == ([generator], [])
    with pytest.raises(StopIteration):
        next(generator)


def test_wait_over_a_task_generator(ray):
    @ray.remote
    def count(n):
        for i in range(n):
            yield i

    generator = count.remote(2)
    assert ray.get(_next_within(ray, generator)) == 0
    assert ray.get(_next_within(ray, generator)) == 1
    ready, _ = ray.wait([generator], timeout=CALL_TIMEOUT_S)
    assert ready == [generator]
    with pytest.raises(StopIteration):
        next(generator)


def test_dynamic_returns_of_a_task(ray):
    @ray.remote(num_returns="dynamic")
    def split(n):
        for i in range(n):
            yield i * 10
        yield b"x" * (2 * 1024 * 1024)       # a value large enough for the store

    ref = split.remote(3)
    assert isinstance(ref, ray.ObjectRef)
    dynamic = ray.get(ref, timeout=CALL_TIMEOUT_S)
    assert isinstance(dynamic, ray.DynamicObjectRefGenerator)
    assert len(dynamic) == 4
    values = ray.get(list(dynamic), timeout=CALL_TIMEOUT_S)
    assert values[:3] == [0, 10, 20] and values[3] == b"x" * (2 * 1024 * 1024)

    @ray.remote
    def total(generator):
        return sum(ray.get(list(generator))[:3])

    # The generator (and the refs in it) can be passed on like any value.
    assert ray.get(total.remote(dynamic), timeout=CALL_TIMEOUT_S) == 30


def test_dynamic_returns_keep_the_error_as_the_last_ref(ray):
    @ray.remote(num_returns="dynamic")
    def partial():
        yield 1
        raise KeyError("midway")

    refs = list(ray.get(partial.remote(), timeout=CALL_TIMEOUT_S))
    assert len(refs) == 2
    assert ray.get(refs[0]) == 1
    with pytest.raises(KeyError):
        ray.get(refs[1])


@pytest.mark.parametrize("is_async", [False, True])
def test_dynamic_returns_of_an_actor_method(ray, is_async):
    if is_async:
        @ray.remote
        class Splitter:
            @ray.method(num_returns="dynamic")
            async def split(self, n):
                for i in range(n):
                    yield i
    else:
        @ray.remote
        class Splitter:
            def split(self, n):
                for i in range(n):
                    yield i

    splitter = Splitter.remote()
    ref = splitter.split.options(num_returns="dynamic").remote(3)
    dynamic = ray.get(ref, timeout=CALL_TIMEOUT_S)
    assert isinstance(dynamic, ray.DynamicObjectRefGenerator)
    assert ray.get(list(dynamic), timeout=CALL_TIMEOUT_S) == [0, 1, 2]


def test_cancel_a_task_generator_mid_stream(ray):
    @ray.remote
    def ticks():
        i = 0
        while True:
            yield i
            i += 1
            time.sleep(0.02)

    generator = ticks.remote()
    assert ray.get(_next_within(ray, generator)) == 0
    ray.cancel(generator)
    values, error = _drain_until_error(ray, generator)
    assert isinstance(error, ray.exceptions.TaskCancelledError)
    assert values == list(range(1, len(values) + 1))
