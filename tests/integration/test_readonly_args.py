"""Numpy arrays that come out of the object store -- a task's or an actor
call's arguments, and what `get` returns -- are read-only views of shared
memory, as in Ray: writing into one raises ValueError, and a copy is
writable."""
from __future__ import annotations

import numpy as np
import pytest

CALL_TIMEOUT_S = 60
BIG = 200_000   # float64s: 1.6 MB, well past the inline limit, so stored


def _write_first(array):
    try:
        array[0] = 1.0
    except ValueError as exc:
        return f"ValueError: {exc}"
    return "written"


@pytest.mark.parametrize("how", ["value", "ref", "nested"])
def test_task_argument_from_the_store_is_read_only(ray, how):
    @ray.remote
    def write(array_or_list):
        array = array_or_list[0] if isinstance(array_or_list, list) else array_or_list
        copy = array.copy()
        copy[0] = 1.0            # a copy is the caller's to change
        return _write_first(array)

    array = np.zeros(BIG)
    arg = {"value": array, "ref": ray.put(array), "nested": [array]}[how]
    outcome = ray.get(write.remote(arg), timeout=CALL_TIMEOUT_S)
    assert outcome == "ValueError: assignment destination is read-only"


@pytest.mark.parametrize("kind", ["plain", "async"])
def test_actor_call_argument_is_read_only(ray, kind):
    if kind == "async":
        @ray.remote
        class Writer:
            async def write(self, array):
                return _write_first(array)
    else:
        @ray.remote
        class Writer:
            def write(self, array):
                return _write_first(array)

    writer = Writer.remote()
    for arg in (np.zeros(BIG), ray.put(np.zeros(BIG))):
        outcome = ray.get(writer.write.remote(arg), timeout=CALL_TIMEOUT_S)
        assert outcome == "ValueError: assignment destination is read-only"


def test_get_returns_a_read_only_view(ray):
    @ray.remote
    def make():
        return np.zeros(BIG)

    for ref in (make.remote(), ray.put(np.zeros(BIG))):
        array = ray.get(ref, timeout=CALL_TIMEOUT_S)
        with pytest.raises(ValueError, match="read-only"):
            array[0] = 1.0
        with pytest.raises(ValueError, match="read-only"):
            array += 1
