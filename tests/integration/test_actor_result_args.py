"""An actor call's result passed to a task stays alive until that task has it.

Ray's synchronous parameter-server pattern rebinds the variable holding the
previous round's ref right after submitting the tasks that read it; the
task must still get its argument when the result arrives after that.
"""
from __future__ import annotations

import sys

import cloudpickle

cloudpickle.register_pickle_by_value(sys.modules[__name__])


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


def test_a_dropped_result_nobody_passed_on_is_still_released(ray):
    from meshray.core import state as state_mod

    @ray.remote
    class Source:
        def value(self):
            return 1

    source = Source.remote()
    core = state_mod.state.core
    before = len(core._register_on_arrival)
    value = source.value.remote()
    object_id = value.binary()
    del value
    ray.get(source.value.remote())           # the dropped call's reply has arrived too
    assert object_id not in core._local_refs and object_id not in core._values
    assert len(core._register_on_arrival) == before
