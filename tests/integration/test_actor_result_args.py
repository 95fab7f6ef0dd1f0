"""An actor call's result passed to a task stays alive until that task has it.

Ray's synchronous parameter-server pattern rebinds the variable holding the
previous round's ref right after submitting the tasks that read it.
Today that task never gets its argument (found while writing
examples/ray_patterns/parameter_server.py, which keeps every round's ref).
"""
from __future__ import annotations

import sys

import cloudpickle
import pytest

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.mark.xfail(strict=True, reason="the caller frees an actor call's result that a "
                   "submitted task still needs once its own handle is dropped")
def test_task_gets_an_actor_result_whose_handle_the_caller_dropped(ray):
    @ray.remote
    class Source:
        def value(self):
            return 1

    @ray.remote
    def plus_one(x):
        return x + 1

    source = Source.remote()
    value = source.value.remote()
    result = plus_one.remote(value)
    del value
    assert ray.get(result, timeout=10) == 2
