"""The shared-memory object store as users see it: zero-copy, freeing, spilling."""
from __future__ import annotations

import gc
import os

import numpy as np
import pytest

from tests.helpers import wait_for


pytestmark = pytest.mark.meshray_init(num_cpus=2, object_store_memory=64 * 1024 * 1024)


def _store_dir(ray):
    from meshray.core.state import state
    return state.core.store_dir


def _store_files(ray):
    return set(os.listdir(_store_dir(ray)))


def test_small_values_stay_inline(ray):
    before = _store_files(ray)
    ref = ray.put(b"x" * 1000)
    assert ray.get(ref) == b"x" * 1000
    assert _store_files(ray) == before


def test_large_numpy_is_zero_copy_and_read_only(ray):
    array = np.arange(1_000_000, dtype=np.int64)
    ref = ray.put(array)
    assert ref.hex() in _store_files(ray)
    first = ray.get(ref)
    second = ray.get(ref)
    np.testing.assert_array_equal(first, array)
    assert not first.flags.writeable
    # Both reads map the same shared memory: no copy was made for either.
    assert np.shares_memory(first, second)
    with pytest.raises(ValueError):
        first[0] = 1


def test_large_task_argument_and_return(ray):
    @ray.remote
    def total_and_echo(a):
        return float(a.sum()), a * 2

    array = np.ones(500_000)
    total, doubled = ray.get(total_and_echo.remote(array))
    assert total == 500_000.0
    np.testing.assert_array_equal(doubled, array * 2)


def test_memory_freed_when_last_ref_dropped(ray):
    ref = ray.put(np.zeros(300_000))
    name = ref.hex()
    assert name in _store_files(ray)
    del ref
    gc.collect()
    wait_for(lambda: name not in _store_files(ray), message="object file deleted")


def test_object_kept_alive_by_pending_task_and_container(ray):
    @ray.remote
    def consume(container):
        return float(ray.get(container[0]).sum())

    inner = ray.put(np.ones(200_000))
    name = inner.hex()
    outer = ray.put([inner])
    del inner
    gc.collect()
    assert name in _store_files(ray)   # held by `outer`, which contains it
    assert ray.get(consume.remote(outer)) == 200_000.0
    del outer
    gc.collect()
    wait_for(lambda: name not in _store_files(ray), message="nested object freed with container")


def test_spills_when_full_and_restores(ray):
    # 64 MiB store, 6 x 16 MiB objects: some must spill to disk.
    refs = [ray.put(np.full(2_000_000, i, dtype=np.float64)) for i in range(6)]
    for i, ref in enumerate(refs):
        value = ray.get(ref)
        assert value[0] == i and value[-1] == i and value.shape == (2_000_000,)


def test_object_larger_than_store_is_store_full_error(ray):
    with pytest.raises(ray.exceptions.ObjectStoreFullError):
        ray.put(np.zeros(80 * 1024 * 1024 // 8 + 1000))
