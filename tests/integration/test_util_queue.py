"""ray.util.queue.Queue on a real cluster: blocking, timeouts, sharing."""
from __future__ import annotations

import queue as std_queue

import pytest

from meshray.util.queue import Empty, Full, Queue


def test_fifo_and_sizes(ray):
    q = Queue(maxsize=3)
    assert q.empty() and not q.full() and q.qsize() == 0 and len(q) == 0
    for item in ("a", "b", "c"):
        q.put(item)
    assert q.full() and q.size() == 3
    assert [q.get(), q.get_nowait(), q.get(block=False)] == ["a", "b", "c"]
    assert q.empty()


def test_timeouts_raise_empty_and_full(ray):
    q = Queue(maxsize=1)
    with pytest.raises(Empty):
        q.get(timeout=0.05)
    with pytest.raises(Empty):
        q.get_nowait()
    q.put(1)
    with pytest.raises(Full):
        q.put(2, timeout=0.05)
    with pytest.raises(Full):
        q.put_nowait(2)
    assert issubclass(Empty, std_queue.Empty) and issubclass(Full, std_queue.Full)
    assert q.get(timeout=0) == 1          # an item already there is returned at once
    with pytest.raises(ValueError, match="non-negative"):
        q.get(timeout=-1)


def test_batches_go_in_whole_or_not_at_all(ray):
    q = Queue(maxsize=3)
    q.put_nowait_batch([1, 2])
    with pytest.raises(Full, match="Cannot add 2 items"):
        q.put_nowait_batch([3, 4])
    assert q.qsize() == 2
    with pytest.raises(Empty, match="Cannot get 3 items"):
        q.get_nowait_batch(3)
    assert q.get_nowait_batch(2) == [1, 2]
    with pytest.raises(TypeError, match="num_items"):
        q.get_nowait_batch("2")
    with pytest.raises(ValueError, match="nonnegative"):
        q.get_nowait_batch(-1)
    with pytest.raises(TypeError, match="Iterable"):
        q.put_nowait_batch(5)


def test_producer_task_and_consumer_actor_share_one_queue(ray):
    q = Queue()

    @ray.remote
    class Consumer:
        def take(self, queue, count):
            return [queue.get(timeout=60) for _ in range(count)]

    @ray.remote
    def produce(queue, count):
        for i in range(count):
            queue.put(i)
        return count

    consumer = Consumer.remote()
    # The consumer blocks in get() first: puts must still reach the queue.
    taken = consumer.take.remote(q, 5)
    assert ray.get(produce.remote(q, 5)) == 5
    assert ray.get(taken) == [0, 1, 2, 3, 4]
    assert q.empty()


def test_put_async_and_get_async_from_an_async_actor(ray):
    q = Queue(maxsize=2)

    @ray.remote
    class AsyncUser:
        async def take(self, queue, count):
            return [await queue.get_async(timeout=60) for _ in range(count)]

        async def give(self, queue, items):
            for item in items:
                await queue.put_async(item, timeout=60)
            return len(items)

        async def refusals(self, queue):
            seen = []
            for attempt in (lambda: queue.get_async(block=False),
                            lambda: queue.get_async(timeout=0.05)):
                try:
                    await attempt()
                except Empty:
                    seen.append("Empty")
            await queue.put_async("a")
            await queue.put_async("b", block=False)
            for attempt in (lambda: queue.put_async("c", block=False),
                            lambda: queue.put_async("c", timeout=0.05)):
                try:
                    await attempt()
                except Full:
                    seen.append("Full")
            seen.append([await queue.get_async(), await queue.get_async(block=False)])
            return seen

    user = AsyncUser.remote()
    # take() awaits in the actor while give() runs on the same actor's loop:
    # neither blocks it, and five items pass a queue that holds two.
    taken = user.take.remote(q, 5)
    assert ray.get(user.give.remote(q, [0, 1, 2, 3, 4]), timeout=60) == 5
    assert ray.get(taken, timeout=60) == [0, 1, 2, 3, 4]
    assert ray.get(user.refusals.remote(q), timeout=60) == \
        ["Empty", "Empty", "Full", "Full", ["a", "b"]]
    assert q.empty()


def test_a_blocked_get_does_not_hold_the_queue(ray):
    q = Queue()
    # Calls from one caller start in the order sent: the get below is waiting
    # inside the actor before qsize() arrives, and both must be answered.
    waiting = q.actor.get.remote(None)
    assert q.qsize() == 0
    q.put("x")
    assert ray.get(waiting, timeout=60) == (True, "x")
    assert q.empty()


def test_shutdown_ends_the_actor(ray):
    q = Queue(actor_options={"num_cpus": 0})
    q.put(1)
    actor = q.actor
    q.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        q.get()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.qsize.remote(), timeout=30)
    q.shutdown()                    # a second shutdown does nothing


def test_bad_arguments_name_themselves(ray):
    with pytest.raises(TypeError, match="maxsize"):
        Queue(maxsize="3")
    with pytest.raises(TypeError, match="actor_options"):
        Queue(actor_options=[("num_cpus", 0)])
