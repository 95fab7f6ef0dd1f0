"""Pure parts of meshray.util and the custom-serializer registry (no cluster)."""
from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest

from meshray.core import serialization
from meshray.util.runtime_info import _live_named


class _Locked:
    def __init__(self, value):
        self.value = value
        self.lock = threading.Lock()


def _flatten(obj):
    return obj.value


def _rebuild(value):
    return ("rebuilt", value)


def test_registered_reducer_is_used_by_serialize_and_can_be_removed():
    with pytest.raises(TypeError, match="could not serialize"):
        serialization.serialize(_Locked(1))
    serialization.register_reducer(_Locked, _flatten, _rebuild)
    try:
        data = serialization.serialize({"k": [_Locked(2)]})
        assert serialization.deserialize_inline(data.inband) == {"k": [("rebuilt", 2)]}
        # Large buffers inside still travel out of band.
        big = np.arange(200_000, dtype=np.int64)
        data = serialization.serialize([_Locked(3), big])
        assert data.buffers
        value = serialization.deserialize_buffers(data.inband, data.buffers)
        assert value[0] == ("rebuilt", 3) and np.array_equal(value[1], big)
    finally:
        serialization.unregister_reducer(_Locked)
    serialization.unregister_reducer(_Locked)        # twice: no effect
    with pytest.raises(TypeError, match="could not serialize"):
        serialization.serialize(_Locked(1))
    assert pickle.loads(serialization.dumps([1, "a"])) == [1, "a"]


def test_register_reducer_refuses_what_it_cannot_honour():
    with pytest.raises(TypeError, match="cls="):
        serialization.register_reducer(_Locked(1), _flatten, _rebuild)
    with pytest.raises(ValueError, match="built-in"):
        serialization.register_reducer(int, _flatten, _rebuild)
    with pytest.raises(TypeError, match="serializer="):
        serialization.register_reducer(_Locked, "not callable", _rebuild)


def test_live_named_skips_dead_unnamed_and_malformed_records():
    records = [
        {"name": "a", "namespace": "ns", "state": "ALIVE"},
        {"name": "a", "namespace": "ns", "state": "RESTARTING"},   # listed once
        {"name": "b", "namespace": "ns", "state": "DEAD"},
        {"name": "", "namespace": "ns", "state": "ALIVE"},
        {"name": 5, "namespace": "ns", "state": "ALIVE"},
        {"name": "c", "namespace": ["ns"], "state": "ALIVE"},
        "not a record",
        {"name": "d", "state": "PENDING"},
    ]
    assert _live_named(records) == [("", "d"), ("ns", "a")]
    assert _live_named({"not": "a list"}) == []
