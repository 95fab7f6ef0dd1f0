"""Freed large object files are reused for the next large put, never under a reader."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid

import numpy as np
import pytest

from meshray.object_store import ObjectStore, object_size, read_object, write_object
from meshray.object_store.recycle import RECYCLE_MIN_BYTES, RECYCLED_SUFFIX

SIZE = RECYCLE_MIN_BYTES  # buffer bytes: just large enough to be recycled


@pytest.fixture
def store():
    root = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    base = os.path.join(root, f"meshray-test-recycle-{uuid.uuid4().hex[:8]}")
    spill = tempfile.mkdtemp(prefix="meshray-test-spill-")
    store = ObjectStore(os.path.join(base, "shm"), spill, capacity_bytes=8 * SIZE)
    yield store
    store.destroy()
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(spill, ignore_errors=True)


def oid(n: int) -> bytes:
    return n.to_bytes(4, "big") * 5


def put(store, object_id, fill) -> None:
    data = np.full(SIZE // 8, fill, dtype=np.int64)
    size = object_size(0, [data.nbytes])
    path = store.reserve(object_id, size, recycled=True)
    write_object(path, b"", [data])
    store.seal(object_id, size)


def pooled(store) -> list:
    directory = os.path.join(store.shm_dir, ".recycle")
    return os.listdir(directory) if os.path.isdir(directory) else []


def test_a_freed_unmapped_file_serves_the_next_put(store):
    store.mapped = lambda path: False
    put(store, oid(1), 1)
    store.delete(oid(1))
    assert len(pooled(store)) == 1
    put(store, oid(2), 2)
    assert pooled(store) == []                     # taken, not copied
    _inband, buffers = read_object(store.path_for(oid(2)))
    assert (np.frombuffer(buffers[0], dtype=np.int64) == 2).all()
    assert not any(name.endswith(RECYCLED_SUFFIX) for name in os.listdir(store.shm_dir))


def test_creators_that_do_not_write_in_place_never_get_a_recycled_file(store):
    """Pulls write through a ChunkWriter of their own: a hand-out would be orphaned."""
    store.mapped = lambda path: False
    put(store, oid(1), 1)
    store.delete(oid(1))
    path = store.reserve(oid(2), object_size(0, [SIZE]))
    assert not os.path.exists(path + RECYCLED_SUFFIX)
    assert len(pooled(store)) == 1
    store.abort(oid(2))


def test_a_file_someone_maps_is_never_reused(store):
    seen = []
    store.mapped = lambda path: seen.append(path) or True
    put(store, oid(1), 1)
    store.delete(oid(1))
    assert seen and pooled(store) == []


def test_nothing_is_recycled_without_a_way_to_tell(store):
    put(store, oid(1), 1)
    store.delete(oid(1))
    assert pooled(store) == []


def test_pooled_files_are_given_up_before_objects_are_spilled():
    unit = object_size(0, [SIZE])
    root = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    base = os.path.join(root, f"meshray-test-recycle-{uuid.uuid4().hex[:8]}")
    spill = tempfile.mkdtemp(prefix="meshray-test-spill-")
    store = ObjectStore(os.path.join(base, "shm"), spill, capacity_bytes=4 * unit)
    try:
        store.mapped = lambda path: False
        for n in range(4):
            put(store, oid(n), n)                  # the store is full
        store.delete(oid(0))
        store.delete(oid(1))
        assert len(pooled(store)) == 2
        big = np.zeros(2 * SIZE // 8, dtype=np.int64)   # too big to take a pooled file
        size = object_size(0, [big.nbytes])
        write_object(store.reserve(oid(9), size, recycled=True), b"", [big])
        store.seal(oid(9), size)
        assert pooled(store) == []
        assert store.stats()["spilled_bytes"] == 0
        assert not store.is_spilled(oid(2)) and not store.is_spilled(oid(3))
    finally:
        store.destroy()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(spill, ignore_errors=True)


def test_an_unused_hand_out_is_removed_with_its_reservation(store):
    store.mapped = lambda path: False
    put(store, oid(1), 1)
    store.delete(oid(1))
    size = object_size(0, [SIZE])
    path = store.reserve(oid(2), size, recycled=True)
    assert os.path.exists(path + RECYCLED_SUFFIX)
    store.abort(oid(2))
    assert not os.path.exists(path + RECYCLED_SUFFIX)


def test_a_view_outliving_its_ref_keeps_its_data():
    """End to end: the daemon's maps scan protects a numpy view from reuse."""
    import meshray
    meshray.init(num_cpus=1, object_store_memory=16 * SIZE)
    try:
        ref = meshray.put(np.arange(SIZE // 8, dtype=np.int64))
        view = meshray.get(ref)
        del ref
        for _ in range(4):
            meshray.put(np.full(SIZE // 8, 7, dtype=np.int64))
        assert (view == np.arange(SIZE // 8)).all()
    finally:
        meshray.shutdown()
