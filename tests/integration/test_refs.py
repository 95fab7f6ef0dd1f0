"""ObjectRef and ObjectRefGenerator members, and wait()'s edge cases, as Ray documents them."""
import asyncio
import concurrent.futures

import numpy as np
import pytest

pytestmark = pytest.mark.meshray_init(num_cpus=2, object_store_memory=256 * 1024 * 1024)


def test_hex_from_hex_binary_and_hashing_on_live_refs(ray):
    ref = ray.put({"v": 1})
    again = ray.ObjectRef.from_hex(ref.hex())
    assert again == ref and hash(again) == hash(ref) and again is not ref
    assert ray.get(again) == {"v": 1}
    assert ray.ObjectRef.from_binary(ref.binary()) == ref
    assert bytes.fromhex(ref.hex()) == ref.binary()
    assert ref != ray.put({"v": 1})
    assert len({ref, again}) == 1


def test_future_is_a_concurrent_future_with_the_value_or_the_error(ray):
    @ray.remote
    def fail():
        raise KeyError("boom")

    future = ray.put(5).future()
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(timeout=30) == 5
    with pytest.raises(KeyError, match="boom"):
        fail.remote().future().result(timeout=60)


def test_as_future_and_await_in_driver_asyncio_code(ray):
    @ray.remote
    def double(x):
        return 2 * x

    async def main():
        as_future = double.remote(3).as_future()
        assert isinstance(as_future, asyncio.Future)
        return await as_future, await double.remote(4), await asyncio.gather(
            double.remote(5), double.remote(6))

    assert asyncio.run(main()) == (6, 8, [10, 12])


def test_await_inside_an_async_actor(ray):
    @ray.remote
    def slow_value():
        return "ready"

    @ray.remote
    class Awaiter:
        async def wait_for(self, refs):
            return await refs[0]        # inside a list: the actor gets the ref itself

    assert ray.get(Awaiter.remote().wait_for.remote([slow_value.remote()]), timeout=60) \
        == "ready"


def test_generator_next_ready_is_finished_completed(ray):
    @ray.remote(num_returns="streaming")
    def gen():
        yield 1
        yield 2

    generator = gen.remote()
    assert ray.get(next(generator)) == 1
    ray.get(generator.completed(), timeout=60)       # the task has finished
    assert generator.next_ready() and not generator.is_finished()
    assert ray.get(next(generator)) == 2
    assert not generator.next_ready() and generator.is_finished()
    with pytest.raises(StopIteration):
        next(generator)


def test_generator_close_stops_iteration(ray):
    @ray.remote(num_returns="streaming")
    def count():
        yield from range(3)

    generator = count.remote()
    assert ray.get(next(generator)) == 0
    generator.close()
    assert generator.is_finished() and not generator.next_ready()
    with pytest.raises(StopIteration):
        next(generator)


def test_wait_on_an_empty_list(ray):
    assert ray.wait([]) == ([], [])
    assert ray.wait([], num_returns=0, timeout=0) == ([], [])


def test_wait_fetch_local_false_is_accepted_and_counts_existing_values(ray):
    big = ray.put(np.zeros(2 * 1024 * 1024, dtype=np.uint8))       # in the store
    small = ray.put(1)
    for fetch_local in (True, False):
        ready, rest = ray.wait([big, small], num_returns=2, timeout=30, fetch_local=fetch_local)
        assert ready == [big, small] and rest == []
    with pytest.raises(ValueError, match="fetch_local='no'"):
        ray.wait([small], fetch_local="no")


def _refuse_to_load():
    raise RuntimeError("cannot be rebuilt")


class FailsOnLoad(Exception):
    def __reduce__(self):
        return (_refuse_to_load, ())


def test_an_error_that_cannot_travel_arrives_as_unserializable_exception(ray):
    @ray.remote
    def fail():
        raise FailsOnLoad("payload 7")

    with pytest.raises(ray.exceptions.UnserializableException, match="payload 7") as info:
        ray.get(fail.remote(), timeout=60)
    assert isinstance(info.value, ray.exceptions.RayTaskError)   # the task's error still


def test_a_wrong_token_is_an_authentication_error(ray):
    from meshray import security
    from meshray.core import state as state_mod
    from meshray.core.core_worker import CoreWorker
    with pytest.raises(ray.exceptions.AuthenticationError, match="cluster token"):
        CoreWorker(daemon_address=state_mod.state.local_node.local_address,
                   token=security.generate_token(), role="driver", job_id=b"\x01" * 8)
