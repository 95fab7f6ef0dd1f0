"""Which tasks a process may push on a worker lease (core/task_leases.py, `pushable`).

Only a task the node would hand unchanged to a plain worker of its own is
pushed; every other kind keeps the node's path, and the reason names it.
"""
from __future__ import annotations

import pytest

from meshray.core.task_leases import _spend_retry, pushable
from meshray.rpc.generated import meshray_pb2 as pb


def _spec(**fields) -> pb.TaskSpec:
    spec = pb.TaskSpec(task_id=b"t" * 16, function_id=b"f" * 16, num_returns=1,
                       resources={"CPU": 1.0}, scheduling_strategy="DEFAULT", max_retries=3)
    for name, value in fields.items():
        if isinstance(value, dict):
            getattr(spec, name).update(value)
        else:
            setattr(spec, name, value)
    return spec


def test_a_plain_task_may_be_pushed():
    assert pushable(_spec()) == ""
    assert pushable(_spec(num_returns=0, resources={"memory": 1e6})) == ""
    assert pushable(_spec(scheduling_strategy="")) == ""


@pytest.mark.parametrize("fields, why", [
    ({"actor_id": b"a" * 16}, "actor"),
    ({"actor_creation": True}, "actor"),
    ({"num_returns": -1}, "generator"),
    ({"dynamic_returns": True}, "generator"),
    ({"scheduling_strategy": "SPREAD"}, "SPREAD"),
    ({"scheduling_strategy": "PlacementGroupSchedulingStrategy", "strategy_blob": b"x"},
     "PlacementGroupSchedulingStrategy"),
    ({"runtime_env_json": '{"env_vars": {"A": "1"}}'}, "runtime environment"),
    ({"env_vars": {"A": "1"}}, "runtime environment"),
    ({"resources": {"GPU": 1.0}}, "resources other than CPU and memory"),
    ({"resources": {"custom": 1.0}}, "resources other than CPU and memory"),
    ({"args_image": True}, "argument file"),
])
def test_other_tasks_go_through_the_node_and_say_why(fields, why):
    assert why in pushable(_spec(**fields))


def test_a_retry_is_a_new_attempt_and_spends_one_of_max_retries():
    spec = _spec(max_retries=1)
    assert _spend_retry(spec) and spec.max_retries == 0 and spec.attempt == 1
    assert not _spend_retry(spec) and spec.attempt == 1
    forever = _spec(max_retries=-1)
    assert _spend_retry(forever) and forever.max_retries == -1 and forever.attempt == 1
