"""Argument files for large actor-call arguments (meshray/core/arg_files.py, meshray/common/arg_dir.py)."""
from __future__ import annotations

import os
import pickle
import types

import numpy as np
import pytest

from meshray.common import arg_dir
from meshray.core import arg_files
from meshray.object_store import layout

OWNER = bytes(range(16))


def _image(value):
    buffers = []
    inband = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    return inband, buffers


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(arg_files, "_writers", {})
    return str(tmp_path)


def _names(store):
    return sorted(os.listdir(arg_dir.args_dir(store)))


def test_write_map_and_release(store):
    array = np.arange(100_000, dtype=np.float64)
    name = arg_files.write(store, OWNER, *_image(array))
    assert name.startswith(f"{os.getpid()}-{OWNER.hex()}-")
    value = arg_files.load(arg_files.map_file(store, name))
    np.testing.assert_array_equal(value, array)
    assert not value.flags.writeable
    arg_files.release(store, OWNER, name)
    assert _names(store) == []
    np.testing.assert_array_equal(value, array)   # the mapping outlives the file


def test_released_files_are_reused_and_resized(store):
    first = arg_files.write(store, OWNER, *_image(np.ones(50_000)))
    arg_files.release(store, OWNER, first, reusable=True)
    assert _names(store) == [first]                   # pooled
    again = arg_files.write(store, OWNER, *_image(np.full(50_000, 2.0)))
    assert again == first
    np.testing.assert_array_equal(arg_files.load(arg_files.map_file(store, again)),
                                  np.full(50_000, 2.0))
    arg_files.release(store, OWNER, again, reusable=True)
    smaller = arg_files.write(store, OWNER, *_image(np.full(1000, 3.0)))
    assert smaller == first                           # any pooled file, truncated to fit
    np.testing.assert_array_equal(arg_files.load(arg_files.map_file(store, smaller)),
                                  np.full(1000, 3.0))
    arg_files.release(store, OWNER, smaller)          # not reusable: removed
    assert _names(store) == []


def test_pool_is_bounded_and_expires(store, monkeypatch):
    monkeypatch.setattr(arg_files, "POOL_BYTES", 3 * 100_000)
    names = [arg_files.write(store, OWNER, *_image(np.ones(100_000, np.uint8)))
             for _ in range(5)]
    for name in names:
        arg_files.release(store, OWNER, name, reusable=True)
    assert len(_names(store)) == 2                    # what fits in POOL_BYTES
    monkeypatch.setattr(arg_files, "POOL_IDLE_S", 0.0)
    arg_files.write(store, OWNER, *_image(np.ones(10, np.uint8)))   # expires the idle ones
    assert len(_names(store)) == 1
    arg_files.drop_pool(store, OWNER)


def test_drop_pool(store):
    name = arg_files.write(store, OWNER, *_image(b"x" * 200_000))
    arg_files.release(store, OWNER, name, reusable=True)
    arg_files.drop_pool(store, OWNER)
    assert _names(store) == []


def test_sweep_process_by_worker(store):
    mine = arg_files.write(store, OWNER, *_image(b"a" * 1000))
    other = arg_files.write(store, b"\xff" * 16, *_image(b"b" * 1000))
    assert arg_dir.sweep_process(store, os.getpid(), OWNER) == 1
    assert _names(store) == [other]
    assert arg_dir.sweep_process(store, os.getpid()) == 1
    assert _names(store) == []
    assert mine
    assert arg_dir.sweep_process(str(os.path.join(store, "missing")), 1) == 0


def test_map_rejects_names_outside_the_directory(store):
    for bad in ("../x", "", ".hidden", "a/b"):
        with pytest.raises(ValueError):
            arg_files.map_file(store, bad)


def test_inline_image_round_trip():
    array = np.arange(200_000, dtype=np.int32)
    blob = arg_files.image_bytes(*_image(((array,), {"k": b"v" * 200_000})))
    args, kwargs = arg_files.load(arg_files.unpack_inline(blob))
    np.testing.assert_array_equal(args[0], array)
    assert not args[0].flags.writeable
    assert kwargs == {"k": b"v" * 200_000}
    with pytest.raises(layout.CorruptObjectError):
        arg_files.unpack_inline(b"\x80\x05not an image")


def test_connection_sends_a_file_inline_when_the_actor_moved(store):
    from meshray.core.actor_client import ActorConnection, PendingCall
    from meshray.rpc.generated import meshray_pb2 as pb

    core = types.SimpleNamespace(store_dir=store, worker_id=OWNER)
    connection = ActorConnection(core, b"a" * 16)
    name = arg_files.write(store, OWNER, *_image(((np.ones(70_000),), {})))
    with open(os.path.join(arg_dir.args_dir(store), name), "rb") as handle:
        image = handle.read()
    spec = pb.TaskSpec(task_id=b"t", args_image=True, args_file=name)
    call = PendingCall(spec, [], [], 0, arg_file=name)
    connection._inline_arg_file(call)
    assert (spec.args_file, call.arg_file, spec.args_blob) == ("", "", image)
    assert _names(store) == []


def test_idle_pool_files_expire_without_further_calls(store, monkeypatch):
    import time
    monkeypatch.setattr(arg_files, "POOL_IDLE_S", 0.1)
    name = arg_files.write(store, OWNER, *_image(b"x" * 200_000))
    arg_files.release(store, OWNER, name, reusable=True)
    assert _names(store) == [name]
    deadline = time.monotonic() + 10
    while _names(store) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _names(store) == []
