"""Object files on a real tmpfs, the node store's spilling, and chunked transfer.

Every test works in its own directory under /dev/shm (or the temp dir where
there is no /dev/shm) and removes it afterwards.
"""

import gc
import hashlib
import os
import pickle
import random
import shutil
import stat
import tempfile
import threading
import uuid

import numpy as np
import pytest

from meshray.object_store import layout
from meshray.object_store import store as store_mod
from meshray.object_store import (
    ALIGNMENT,
    ChunkWriter,
    CorruptObjectError,
    ObjectExistsError,
    ObjectStateError,
    ObjectStore,
    ObjectStoreFullError,
    UnknownObjectError,
    copy_file_chunks,
    default_capacity,
    make_private_dir,
    object_size,
    read_object,
    read_object_layout,
    unpack_object,
    write_object,
    write_object_into,
)

BACKENDS = ["libc", "mmap"] if layout._LIBC_MMAP is not None else ["mmap"]
SHM_ROOT = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


@pytest.fixture
def tmp_shm():
    path = os.path.join(SHM_ROOT, f"meshray-test-{os.getpid()}-{uuid.uuid4().hex[:10]}")
    os.mkdir(path, 0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setattr(layout, "map_backend", request.param)
    return request.param


@pytest.fixture
def make_store(tmp_shm):
    stores = []

    def make(capacity):
        s = ObjectStore(
            os.path.join(tmp_shm, f"shm-{len(stores)}"),
            os.path.join(tmp_shm, f"spill-{len(stores)}"),
            capacity,
        )
        stores.append(s)
        return s

    yield make
    for s in stores:
        s.destroy()


def serialize(obj):
    buffers = []
    inband = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return inband, buffers


def deserialize(inband, buffers):
    return pickle.loads(inband, buffers=buffers)


def mapped_ranges(path):
    """Address ranges this process has mapped from ``path`` (deleted or not)."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6:
                name = parts[5].rstrip("\n")
                if name == path or name == path + " (deleted)":
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    ranges.append((lo, hi))
    return ranges


def data_address(arr):
    return arr.__array_interface__["data"][0]


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def oid(n):
    return n.to_bytes(4, "big") + b"\x11" * 24  # 28 bytes, like a Ray ObjectID


def put(store, object_id, value):
    """What a creator does: reserve, write the file, ask the daemon to seal."""
    inband, buffers = serialize(value)
    size = object_size(len(inband), [b.raw().nbytes for b in buffers])
    path = store.reserve(object_id, size)
    assert write_object(path, inband, buffers) == size
    store.seal(object_id, size)
    return size


def get(store, object_id):
    path = store.ensure_in_memory(object_id, pin=True)
    try:
        return deserialize(*read_object(path))
    finally:
        store.unpin(object_id)


# ------------------------------------------------------------------ layout


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc")
def test_numpy_round_trip_is_zero_copy_and_read_only(tmp_shm, backend):
    value = {
        "vec": np.arange(100_000, dtype=np.float64),
        "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        "ints": np.arange(1000, dtype=np.int32).reshape(10, 100),
        "empty": np.empty(0, dtype=np.uint8),
        "meta": {"name": "x", "n": 3},
    }
    inband, buffers = serialize(value)
    assert len(buffers) >= 3
    path = os.path.join(tmp_shm, "obj")
    write_object(path, inband, buffers)

    out = deserialize(*read_object(path))

    assert out["meta"] == value["meta"]
    for key in ("vec", "fortran", "ints", "empty"):
        np.testing.assert_array_equal(out[key], value[key])
        assert out[key].dtype == value[key].dtype
        assert not out[key].flags.writeable
    assert out["fortran"].flags.f_contiguous
    with pytest.raises(ValueError):
        out["vec"][0] = 1.0

    ranges = mapped_ranges(path)
    assert ranges, "the object file should be mapped into this process"
    for key in ("vec", "fortran", "ints"):
        lo = data_address(out[key])
        hi = lo + out[key].nbytes
        assert any(a <= lo and hi <= b for a, b in ranges), f"{key} was copied"
        assert lo % ALIGNMENT == 0

    # The array's base chain ends at a read-only view exported by the mapping.
    base = out["vec"].base
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, memoryview) and base.readonly


def test_layout_is_aligned_and_size_is_predicted(tmp_shm):
    cases = [
        (b"", []),
        (b"x" * 5, []),
        (b"abc", [b"1"]),
        (b"y" * 100, [b"a" * 63, b"", b"b" * 65, b"c" * 64, b"d"]),
        (b"z" * 7, [bytes(range(256)) * 40 for _ in range(9)]),
    ]
    for i, (inband, buffers) in enumerate(cases):
        path = os.path.join(tmp_shm, f"o{i}")
        size = write_object(path, inband, buffers)
        assert size == object_size(len(inband), [len(b) for b in buffers])
        assert os.path.getsize(path) == size
        lay = read_object_layout(path)
        assert lay.total_size == size
        assert lay.inband_offset % ALIGNMENT == 0
        assert all(o % ALIGNMENT == 0 for o in lay.buffer_offsets)
        got_inband, got_buffers = read_object(path)
        assert bytes(got_inband) == inband
        assert [bytes(b) for b in got_buffers] == buffers


def test_write_object_into_matches_the_file_format(tmp_shm):
    inband, buffers = serialize({"a": np.arange(1000), "b": b"\x01" * 300_000})
    size = object_size(len(inband), [b.raw().nbytes for b in buffers])
    blob = bytearray(size + 10)
    assert write_object_into(blob, inband, buffers) == size
    path = os.path.join(tmp_shm, "obj")
    write_object(path, inband, buffers)
    with open(path, "rb") as f:
        assert f.read() == bytes(blob[:size])
    out = deserialize(*unpack_object(bytes(blob[:size])))
    np.testing.assert_array_equal(out["a"], np.arange(1000))
    with pytest.raises(ValueError, match="needs"):
        write_object_into(bytearray(size - 1), inband, buffers)
    with pytest.raises(TypeError):
        write_object_into(bytes(size), inband, buffers)


def test_non_contiguous_buffer_is_refused_with_a_reason(tmp_shm):
    strided = memoryview(bytearray(100))[::2]
    with pytest.raises(BufferError, match="contiguous"):
        write_object(os.path.join(tmp_shm, "obj"), b"x", [strided])
    assert os.listdir(tmp_shm) == []


def test_replacing_a_file_leaves_existing_readers_and_no_partials(tmp_shm, backend):
    path = os.path.join(tmp_shm, "obj")
    write_object(path, *serialize(np.full(50_000, 1.0)))
    first = deserialize(*read_object(path))
    write_object(path, *serialize(np.full(50_000, 2.0)))
    second = deserialize(*read_object(path))
    assert (first == 1.0).all() and (second == 2.0).all()
    assert os.listdir(tmp_shm) == ["obj"]


def test_unlinked_file_stays_readable_while_mapped(tmp_shm, backend):
    path = os.path.join(tmp_shm, "obj")
    expected = np.random.default_rng(1).random(200_000)
    write_object(path, *serialize(expected))
    arr = deserialize(*read_object(path))
    os.unlink(path)
    gc.collect()
    np.testing.assert_array_equal(arr, expected)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_libc_mappings_hold_no_file_descriptors_and_are_released(tmp_shm, monkeypatch):
    if layout._LIBC_MMAP is None:
        pytest.skip("libc mmap not reachable through ctypes here")
    monkeypatch.setattr(layout, "map_backend", "libc")
    paths = []
    for i in range(50):
        paths.append(os.path.join(tmp_shm, f"o{i}"))
        write_object(paths[-1], *serialize(np.full(1000 + i, i)))
    fds_before = len(os.listdir("/proc/self/fd"))
    held = [deserialize(*read_object(p)) for p in paths]
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert all((a == i).all() for i, a in enumerate(held))
    assert mapped_ranges(paths[7])
    del held
    gc.collect()
    assert not mapped_ranges(paths[7]), "mapping should go away with its last view"


# ----------------------------------------------------------- corrupt files


def _valid_file(tmp_shm, name="obj"):
    path = os.path.join(tmp_shm, name)
    write_object(path, *serialize({"a": np.arange(5000), "b": np.ones(10)}))
    with open(path, "rb") as f:
        return path, bytearray(f.read())


def _rewrite(path, data):
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("reader", [read_object, read_object_layout])
def test_corrupt_files_raise_clear_errors(tmp_shm, reader):
    path, good = _valid_file(tmp_shm)

    _rewrite(path, good[:-100])
    with pytest.raises(CorruptObjectError, match=r"truncated.*header says \d+ bytes, file has"):
        reader(path)

    _rewrite(path, good[:20])
    with pytest.raises(CorruptObjectError, match="truncated object file"):
        reader(path)

    _rewrite(path, b"")
    with pytest.raises(CorruptObjectError, match="truncated"):
        reader(path)

    _rewrite(path, b"PK\x03\x04" + bytes(good[4:]))
    with pytest.raises(CorruptObjectError, match="not a meshray object file"):
        reader(path)

    bad_version = bytearray(good)
    bad_version[8] = 99
    _rewrite(path, bad_version)
    with pytest.raises(CorruptObjectError, match="version 99 is not supported"):
        reader(path)

    bad_table = bytearray(good)
    bad_table[48 + 3] ^= 0xFF  # inside the buffer table
    _rewrite(path, bad_table)
    with pytest.raises(CorruptObjectError, match="corrupt object header"):
        reader(path)

    with pytest.raises(CorruptObjectError) as info:
        reader(path)
    assert path in str(info.value)

    with pytest.raises(FileNotFoundError):
        reader(os.path.join(tmp_shm, "missing"))


# --------------------------------------------------------- chunked copies


def test_chunked_copy_reproduces_the_file_exactly(tmp_shm, backend):
    src, _ = _valid_file(tmp_shm, "src")
    dst = os.path.join(tmp_shm, "dst")
    size = os.path.getsize(src)
    writer = ChunkWriter(dst, size)
    offset = 0
    chunks = 0
    for chunk in copy_file_chunks(src, chunk_size=4099):
        assert chunk.readonly and len(chunk) <= 4099
        writer.write(offset, chunk)
        offset += len(chunk)
        chunks += 1
    assert chunks == -(-size // 4099)
    assert not os.path.exists(dst), "file must not appear before finish()"
    assert writer.finish() == size
    assert file_digest(dst) == file_digest(src)
    assert sorted(os.listdir(tmp_shm)) == ["dst", "src"]


def test_chunk_writer_accepts_any_order_duplicates_and_threads(tmp_shm):
    src, data = _valid_file(tmp_shm, "src")
    size = len(data)
    pieces = [(o, bytes(data[o : o + 1000])) for o in range(0, size, 1000)]
    random.Random(7).shuffle(pieces)
    pieces += pieces[:5]  # re-sent chunks
    dst = os.path.join(tmp_shm, "dst")
    writer = ChunkWriter(dst, size)
    threads = [
        threading.Thread(target=lambda part: [writer.write(o, d) for o, d in part], args=(pieces[i::4],))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert writer.missing_ranges() == []
    assert writer.bytes_received == size
    writer.finish()
    assert file_digest(dst) == file_digest(src)


def test_incomplete_or_bad_transfers_leave_nothing_behind(tmp_shm):
    src, data = _valid_file(tmp_shm, "src")
    size = len(data)
    dst = os.path.join(tmp_shm, "dst")

    writer = ChunkWriter(dst, size)
    writer.write(0, data[:100])
    writer.write(200, data[200:])
    assert writer.missing_ranges() == [(100, 200)]
    with pytest.raises(ValueError, match="incomplete: 100 of .* bytes missing"):
        writer.finish()
    with pytest.raises(ValueError, match="outside"):
        writer.write(size - 1, b"xx")
    writer.abort()

    with ChunkWriter(dst, size) as w:
        w.write(0, data[:10])  # leaving the block without finish() aborts

    corrupt = bytearray(data)
    corrupt[0] ^= 1
    writer = ChunkWriter(dst, size)
    writer.write(0, corrupt)
    with pytest.raises(CorruptObjectError, match="not a meshray object file"):
        writer.finish()

    assert os.listdir(tmp_shm) == ["src"]

    with pytest.raises(FileNotFoundError):
        copy_file_chunks(os.path.join(tmp_shm, "missing"), 1024)
    _rewrite(src, data[:-1])
    with pytest.raises(CorruptObjectError, match="truncated"):
        copy_file_chunks(src, 1024)  # fails before the first chunk is asked for


# ------------------------------------------------------------------ store


def test_put_get_and_accounting(make_store, backend):
    store = make_store(10 << 20)
    value = {"a": np.arange(100_000), "tag": "hello"}
    size = put(store, oid(1), value)
    assert store.contains(oid(1)) and not store.is_spilled(oid(1))
    assert store.size_of(oid(1)) == size
    assert store.used_bytes == size and store.num_objects == 1
    assert store.path_for(oid(1)) == os.path.join(store.shm_dir, oid(1).hex())
    out = get(store, oid(1))
    np.testing.assert_array_equal(out["a"], value["a"])
    assert store.object_ids() == [oid(1)]
    assert store.stats()["num_in_memory"] == 1


def test_reserved_objects_are_not_readable_and_requests_are_idempotent(make_store):
    store = make_store(1 << 20)
    inband, buffers = serialize(np.arange(1000))
    size = object_size(len(inband), [b.raw().nbytes for b in buffers])
    path = store.reserve(oid(1), size)
    assert store.reserve(oid(1), size) == path
    assert not store.contains(oid(1)) and store.num_objects == 1
    with pytest.raises(ObjectStateError, match="not sealed"):
        store.ensure_in_memory(oid(1))
    with pytest.raises(FileNotFoundError):
        store.seal(oid(1), size)  # the creator never wrote it
    write_object(path, inband, buffers)
    store.seal(oid(1), size)
    store.seal(oid(1), size)  # retried
    with pytest.raises(ObjectExistsError, match=oid(1).hex()):
        store.reserve(oid(1), size)
    with pytest.raises(UnknownObjectError, match="never reserved"):
        store.seal(oid(2), size)


def test_seal_checks_the_file(make_store):
    store = make_store(1 << 20)
    inband, buffers = serialize(np.arange(1000))
    size = object_size(len(inband), [b.raw().nbytes for b in buffers])

    path = store.reserve(oid(1), size + 4096)
    write_object(path, inband, buffers)
    with pytest.raises(ObjectStateError, match=f"reported {size + 1} bytes but the file holds {size}"):
        store.seal(oid(1), size + 1)
    store.seal(oid(1), size)  # smaller than reserved: the rest is given back
    assert store.used_bytes == size

    path = store.reserve(oid(2), 100)
    with pytest.raises(ObjectStateError, match="only 100 were reserved"):
        store.seal(oid(2), size)
    with open(path, "wb") as f:
        f.write(b"\0" * 100)
    with pytest.raises(CorruptObjectError):
        store.seal(oid(2), 100)
    assert store.abort(oid(2))
    assert store.used_bytes == size and os.listdir(store.shm_dir) == [oid(1).hex()]


def test_full_store_spills_lru_and_restores_on_demand(make_store, backend):
    values = {i: np.random.default_rng(i).random(100_000) for i in range(1, 6)}
    one = object_size(len(serialize(values[1])[0]), [800_000])
    store = make_store(3 * one + 100)
    for i in (1, 2, 3):
        put(store, oid(i), values[i])
    digests = {i: file_digest(store.path_for(oid(i))) for i in (1, 2, 3)}
    store.touch(oid(1))  # now 2 is least recently used

    put(store, oid(4), values[4])
    assert store.is_spilled(oid(2))
    assert not any(store.is_spilled(oid(i)) for i in (1, 3, 4))
    assert not os.path.exists(store.path_for(oid(2)))
    assert os.path.exists(os.path.join(store.spill_dir, oid(2).hex()))
    assert store.spilled_bytes == one and store.used_bytes == 3 * one
    assert store.contains(oid(2)) and store.num_objects == 4

    np.testing.assert_array_equal(get(store, oid(2)), values[2])  # restore spills 3
    assert not store.is_spilled(oid(2)) and store.is_spilled(oid(3))
    assert file_digest(store.path_for(oid(2))) == digests[2]
    assert not os.path.exists(os.path.join(store.spill_dir, oid(2).hex()))
    assert store.used_bytes <= store.capacity
    assert store.spilled_bytes == one

    for i in (1, 2, 3, 4):
        np.testing.assert_array_equal(get(store, oid(i)), values[i])
    assert store.used_bytes <= store.capacity
    assert store.used_bytes + store.spilled_bytes == 4 * one


def test_pinned_and_unsealed_objects_are_never_spilled(make_store):
    value = np.zeros(100_000)
    one = object_size(len(serialize(value)[0]), [800_000])
    store = make_store(2 * one)
    put(store, oid(1), value)
    store.pin(oid(1))
    store.reserve(oid(2), one)  # being written: not spillable either
    with pytest.raises(ObjectStoreFullError) as info:
        put(store, oid(3), value)
    message = str(info.value)
    assert oid(3).hex() in message and "free only 0" in message
    assert store.num_objects == 2 and store.used_bytes == 2 * one

    assert store.unpin(oid(1))
    assert store.unpin(oid(1)) is False  # nothing left to release
    put(store, oid(3), value)
    assert store.is_spilled(oid(1))
    with pytest.raises(ObjectStateError, match="spilled"):
        store.pin(oid(1))
    assert store.unpin(oid(99)) is False


def test_ensure_in_memory_with_pin_holds_the_object(make_store):
    value = np.ones(100_000)
    one = object_size(len(serialize(value)[0]), [800_000])
    store = make_store(2 * one)
    put(store, oid(1), value)
    put(store, oid(2), value)
    put(store, oid(3), value)  # spills 1
    assert store.is_spilled(oid(1))
    store.ensure_in_memory(oid(1), pin=True)  # spills 2
    assert store.is_pinned(oid(1))
    put(store, oid(4), value)  # must spill 3, not the pinned 1
    assert not store.is_spilled(oid(1)) and store.is_spilled(oid(3))


def test_object_larger_than_capacity_is_refused_by_name(make_store):
    store = make_store(1000)
    with pytest.raises(ObjectStoreFullError) as info:
        store.reserve(oid(7), 5000)
    message = str(info.value)
    assert oid(7).hex() in message and "5000" in message and "1000" in message
    assert store.num_objects == 0 and store.used_bytes == 0
    try:
        from meshray.exceptions import ObjectStoreFullError as Public
    except ImportError:
        pass
    else:
        assert ObjectStoreFullError is Public


def test_delete_frees_memory_and_disk(make_store):
    value = np.ones(100_000)
    one = object_size(len(serialize(value)[0]), [800_000])
    store = make_store(one)
    put(store, oid(1), value)
    put(store, oid(2), value)  # spills 1
    assert store.spilled_bytes == one and store.used_bytes == one

    assert store.delete(oid(1))
    assert store.spilled_bytes == 0 and os.listdir(store.spill_dir) == []
    assert store.delete(oid(2))
    assert store.used_bytes == 0 and os.listdir(store.shm_dir) == []
    assert store.num_objects == 0 and not store.contains(oid(2))
    assert store.delete(oid(2)) is False
    with pytest.raises(UnknownObjectError, match=oid(2).hex()):
        store.ensure_in_memory(oid(2))
    with pytest.raises(UnknownObjectError):
        store.size_of(oid(2))

    store.reserve(oid(3), 10)  # an unsealed reservation is only marked ...
    assert store.delete(oid(3)) and store.used_bytes == 10
    assert store.abort(oid(3)) and store.used_bytes == 0  # ... until seal or abort


def test_delete_before_seal_is_applied_at_seal_and_abort_is_immediate(make_store):
    store = make_store(1 << 20)
    inband, buffers = serialize(np.arange(1000))
    size = object_size(len(inband), [b.raw().nbytes for b in buffers])

    path = store.reserve(oid(1), size)
    assert store.delete(oid(1))  # the owner let go while the creator writes
    write_object(path, inband, buffers)
    assert store.seal(oid(1), size) is False
    assert not os.path.exists(path) and store.used_bytes == 0 and store.num_objects == 0

    path = store.reserve(oid(2), size)
    write_object(path, inband, buffers)
    assert store.abort(oid(2))  # the creator died before sealing
    assert not os.path.exists(path) and store.used_bytes == 0
    assert store.abort(oid(2)) is False
    assert os.listdir(store.shm_dir) == []
    put(store, oid(3), np.arange(10))
    with pytest.raises(ObjectStateError, match="use delete"):
        store.abort(oid(3))


def test_readers_survive_delete_and_spill_of_their_object(make_store, backend):
    values = [np.random.default_rng(i).random(150_000) for i in range(3)]
    one = object_size(len(serialize(values[0])[0]), [1_200_000])
    store = make_store(one)
    put(store, oid(0), values[0])
    spilled_reader = get(store, oid(0))
    put(store, oid(1), values[1])  # spills 0 underneath the reader
    assert store.is_spilled(oid(0))
    deleted_reader = get(store, oid(1))
    store.delete(oid(1))
    put(store, oid(2), values[2])
    gc.collect()
    np.testing.assert_array_equal(spilled_reader, values[0])
    np.testing.assert_array_equal(deleted_reader, values[1])


def test_adopt_registers_an_existing_file(make_store):
    value = np.arange(100_000)
    store = make_store(1 << 20)
    size = write_object(store.path_for(oid(1)), *serialize(value))
    assert store.adopt(oid(1)) == size
    assert store.adopt(oid(1)) == size
    assert store.contains(oid(1)) and store.used_bytes == size
    np.testing.assert_array_equal(get(store, oid(1)), value)

    write_object(store.path_for(oid(2)), *serialize(value))
    store.adopt(oid(2))  # does not fit next to 1: 1 is spilled
    assert store.is_spilled(oid(1)) and store.used_bytes == size
    with pytest.raises(FileNotFoundError):
        store.adopt(oid(3))


def test_failed_spill_rolls_back(make_store, monkeypatch):
    value = np.ones(100_000)
    one = object_size(len(serialize(value)[0]), [800_000])
    store = make_store(one)
    put(store, oid(1), value)

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod, "_copy_file", disk_full)
    with pytest.raises(ObjectStoreFullError, match="spilling .* failed"):
        store.reserve(oid(2), one)
    assert store.num_objects == 1 and store.used_bytes == one
    assert not store.is_spilled(oid(1))
    monkeypatch.undo()
    put(store, oid(2), value)
    assert store.is_spilled(oid(1))


def test_object_removed_behind_the_stores_back_is_dropped_when_spilled(make_store):
    value = np.ones(100_000)
    one = object_size(len(serialize(value)[0]), [800_000])
    store = make_store(one)
    put(store, oid(1), value)
    os.unlink(store.path_for(oid(1)))
    put(store, oid(2), value)
    assert not store.contains(oid(1)) and store.spilled_bytes == 0


def test_concurrent_clients_keep_contents_and_counters_consistent(make_store):
    value_of = {i: np.full(20_000, i, dtype=np.int64) for i in range(60)}
    one = object_size(len(serialize(value_of[0])[0]), [160_000])
    store = make_store(6 * one)
    errors = []

    def client(ids):
        rng = random.Random(ids[0])
        try:
            live = []
            for i in ids:
                put(store, oid(i), value_of[i])
                live.append(i)
                for j in rng.sample(live, k=min(3, len(live))):
                    got = get(store, oid(j))
                    assert got[0] == j and got[-1] == j
                if rng.random() < 0.2:
                    assert store.delete(oid(live.pop(rng.randrange(len(live)))))
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(list(range(k, 60, 4)),)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    stats = store.stats()
    assert stats["used_bytes"] <= store.capacity
    assert stats["num_pinned"] == 0
    in_memory = [n for n in os.listdir(store.shm_dir)]
    on_disk = [n for n in os.listdir(store.spill_dir)]
    assert not [n for n in in_memory + on_disk if not all(c in "0123456789abcdef" for c in n)]
    assert stats["used_bytes"] == len(in_memory) * one
    assert stats["spilled_bytes"] == len(on_disk) * one
    assert stats["num_objects"] == len(in_memory) + len(on_disk)
    for id_bytes in store.object_ids():
        i = int.from_bytes(id_bytes[:4], "big")
        np.testing.assert_array_equal(get(store, id_bytes), value_of[i])


# ------------------------------------------------------ directories, sizes


def test_node_directory_is_private(tmp_shm):
    path = make_private_dir(os.path.join(tmp_shm, "meshray-node-a"))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    os.chmod(path, 0o755)
    assert make_private_dir(path) == path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    link = os.path.join(tmp_shm, "link")
    os.symlink(path, link)
    with pytest.raises(FileExistsError, match="not a directory"):
        make_private_dir(link)


def test_default_capacity_is_bounded():
    psutil = pytest.importorskip("psutil")
    capacity = default_capacity()
    assert 0 < capacity <= 0.3 * psutil.virtual_memory().total + 1
    assert capacity <= shutil.disk_usage(SHM_ROOT).free + (1 << 20)


def test_destroy_removes_everything(make_store):
    store = make_store(1 << 20)
    put(store, oid(1), np.arange(10_000))
    store.destroy()
    assert not os.path.exists(store.shm_dir) and not os.path.exists(store.spill_dir)
    with pytest.raises(ObjectStateError, match="destroyed"):
        store.reserve(oid(2), 10)
    assert store.num_objects == 0


def test_bad_ids_and_sizes_are_rejected(make_store):
    store = make_store(1 << 20)
    with pytest.raises(TypeError):
        store.reserve("abc", 10)
    with pytest.raises(ValueError, match="1..127 bytes"):
        store.reserve(b"", 10)
    with pytest.raises(ValueError, match="non-negative"):
        store.reserve(oid(1), -1)
    with pytest.raises(ValueError, match="must differ"):
        ObjectStore(store.shm_dir, store.shm_dir, 10)
