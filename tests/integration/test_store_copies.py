"""Pulled copies in the node store: dropped (not spilled) for room, their pages
reused by the next pull, and the ChunkWriter that writes a pull in place."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid

import numpy as np
import pytest

from meshray.object_store import ObjectStore, object_size, read_object, write_object
from meshray.object_store.layout import ChunkWriter, copy_file_chunks
from meshray.object_store.recycle import RECYCLE_MIN_BYTES, RECYCLED_SUFFIX

SIZE = RECYCLE_MIN_BYTES            # buffer bytes: large enough to be recycled
UNIT = object_size(0, [SIZE])


def _store(capacity_units: int):
    root = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    base = os.path.join(root, f"meshray-test-copies-{uuid.uuid4().hex[:8]}")
    spill = tempfile.mkdtemp(prefix="meshray-test-spill-")
    store = ObjectStore(os.path.join(base, "shm"), spill, capacity_bytes=capacity_units * UNIT)
    return store, base, spill


@pytest.fixture
def store():
    store, base, spill = _store(3)
    yield store
    store.destroy()
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(spill, ignore_errors=True)


@pytest.fixture
def source(tmp_path):
    """Object files to 'pull' from, as a holder would stream them."""
    def make(fill: int) -> str:
        path = str(tmp_path / f"src-{fill}")
        write_object(path, b"", [np.full(SIZE // 8, fill, dtype=np.int64)])
        return path
    return make


def oid(n: int) -> bytes:
    return n.to_bytes(4, "big") * 5


def pull(store, object_id, src: str, *, copy: bool = True, chunk=1 << 20) -> str:
    """What transfer._pull_from does with the chunks of `src`."""
    size = os.path.getsize(src)
    path = store.reserve(object_id, size, recycled=True)
    writer = ChunkWriter(path, size)
    offset = 0
    for piece in copy_file_chunks(src, chunk):
        writer.write(offset, piece)
        offset += len(piece)
    store.seal(object_id, writer.finish())
    if copy:
        store.mark_copy(object_id)
    return path


def values(store, object_id):
    _inband, buffers = read_object(store.path_for(object_id))
    return np.frombuffer(buffers[0], dtype=np.int64)


def leftovers(store) -> list:
    return [n for n in os.listdir(store.shm_dir) if n.endswith(RECYCLED_SUFFIX)]


def test_copies_are_dropped_for_room_not_spilled(store, source):
    dropped = []
    store.on_copy_dropped = dropped.append
    pull(store, oid(1), source(1))
    pull(store, oid(2), source(2), copy=False)         # a primary: spilled if need be
    pull(store, oid(3), source(3))
    pull(store, oid(4), source(4))                     # full: the oldest copy goes
    assert dropped == [oid(1)]
    assert not store.contains(oid(1))
    assert store.stats()["spilled_bytes"] == 0
    assert (values(store, oid(4)) == 4).all()


def test_primaries_spill_only_once_no_copy_is_left(store, source):
    pull(store, oid(1), source(1), copy=False)
    pull(store, oid(2), source(2), copy=False)
    pull(store, oid(3), source(3))
    pull(store, oid(4), source(4), copy=False)
    pull(store, oid(5), source(5), copy=False)
    assert not store.contains(oid(3))                  # the copy went first ...
    assert store.is_spilled(oid(1))                    # ... then the oldest primary spilled
    assert (values(store, oid(5)) == 5).all()


def test_pinned_copies_stay(store, source):
    pull(store, oid(1), source(1))
    store.pin(oid(1))
    pull(store, oid(2), source(2))
    pull(store, oid(3), source(3))
    pull(store, oid(4), source(4))
    assert store.contains(oid(1)) and not store.is_spilled(oid(1))
    assert not store.contains(oid(2))


def test_a_dropped_unmapped_copy_takes_the_next_pull(store, source):
    store.mapped = lambda path: False
    for n in (1, 2, 3):
        pull(store, oid(n), source(n))
    inode = os.stat(store.path_for(oid(1))).st_ino
    pull(store, oid(4), source(4))
    assert os.stat(store.path_for(oid(4))).st_ino == inode    # same pages, rewritten
    assert (values(store, oid(4)) == 4).all()
    assert leftovers(store) == []


def test_a_copy_read_just_now_is_never_rewritten(store, source):
    """A reader handed its path may not have mapped it yet."""
    store.mapped = lambda path: False
    for n in (1, 2, 3):
        pull(store, oid(n), source(n))
    for n in (1, 2, 3):
        store.ensure_in_memory(oid(n))
    keep = open(store.path_for(oid(1)), "rb")          # hold the inode number
    try:
        inode = os.fstat(keep.fileno()).st_ino
        pull(store, oid(4), source(4))
        assert not store.contains(oid(1))               # dropped all the same ...
        assert os.stat(store.path_for(oid(4))).st_ino != inode   # ... but not rewritten
        assert (np.frombuffer(keep.read()[-SIZE:], dtype=np.int64) == 1).all()
    finally:
        keep.close()


def test_a_copy_someone_maps_is_never_rewritten(store, source):
    store.mapped = lambda path: True
    for n in (1, 2, 3):
        pull(store, oid(n), source(n))
    inode = os.stat(store.path_for(oid(1))).st_ino
    view = open(store.path_for(oid(1)), "rb")          # the reader keeps its file
    try:
        pull(store, oid(4), source(4))
        assert os.fstat(view.fileno()).st_ino == inode
        assert os.stat(store.path_for(oid(4))).st_ino != inode
    finally:
        view.close()


def test_a_pull_writes_into_a_recycled_file_and_hides_its_old_bytes(store, source):
    store.mapped = lambda path: False
    pull(store, oid(1), source(1), copy=False)
    store.delete(oid(1))                                # pooled
    size = os.path.getsize(source(2))
    path = store.reserve(oid(2), size, recycled=True)
    assert os.path.exists(path + RECYCLED_SUFFIX)
    writer = ChunkWriter(path, size)
    assert leftovers(store) == []                      # taken by the writer
    writer.write(0, next(copy_file_chunks(source(2), 4096)))
    with pytest.raises(ValueError, match="incomplete"):
        writer.finish()                                 # the rest is the old object's
    writer.abort()
    store.abort(oid(2))
    assert not os.path.exists(path)


def test_a_recycled_file_larger_than_the_pull_is_cut_to_size(store, source):
    store.mapped = lambda path: False
    big = np.zeros(3 * SIZE // 16, dtype=np.int64)     # 1.5x: the pool may hand it out
    size = object_size(0, [big.nbytes])
    write_object(store.reserve(oid(1), size, recycled=True), b"", [big])
    store.seal(oid(1), size)
    inode = os.stat(store.path_for(oid(1))).st_ino
    store.delete(oid(1))
    path = pull(store, oid(2), source(2))
    assert os.stat(path).st_ino == inode
    assert os.path.getsize(path) == UNIT
    assert (values(store, oid(2)) == 2).all()
