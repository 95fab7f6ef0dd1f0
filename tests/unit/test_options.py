"""Option tables and validation for tasks, actors and actor methods."""
import warnings

import pytest

from meshray.core import options as o
from meshray.core.options import (
    InvalidOptionTypeError,
    actor_defaults,
    merge_options,
    method_defaults,
    resolve_max_concurrency,
    resolve_num_returns,
    resource_request,
    scheduling_strategy_from_options,
    task_defaults,
    validate_actor_options,
    validate_method_options,
    validate_task_options,
)
from meshray.util.scheduling_strategies import (
    In,
    NodeAffinitySchedulingStrategy,
    NodeLabelSchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)


class _PG:
    id = "pg"


def test_task_defaults():
    d = task_defaults(is_generator=False)
    assert d["num_cpus"] == 1
    assert d["num_gpus"] is None
    assert d["max_retries"] == 3
    assert d["retry_exceptions"] is False
    assert d["num_returns"] == 1
    assert d["max_calls"] == 0
    assert d["enable_task_events"] is True
    assert d["placement_group"] == "default" and d["placement_group_bundle_index"] == -1
    assert task_defaults(is_generator=True)["num_returns"] == "streaming"
    assert set(d) == set(o.TASK_OPTIONS)


def test_actor_and_method_defaults():
    d = actor_defaults()
    assert d["num_cpus"] is None
    assert d["max_restarts"] == 0 and d["max_task_retries"] == 0
    assert d["max_pending_calls"] == -1 and d["max_concurrency"] is None
    assert d["get_if_exists"] is False and d["lifetime"] is None
    m = method_defaults()
    assert m["num_returns"] == 1 and m["max_task_retries"] is None
    assert method_defaults(is_generator=True)["num_returns"] == "streaming"
    assert resolve_num_returns(None, False) == 1 and resolve_num_returns(2, True) == 2
    assert resolve_max_concurrency(None, is_async=False) == 1
    assert resolve_max_concurrency(None, is_async=True) == 1000
    assert resolve_max_concurrency(7, is_async=True) == 7


@pytest.mark.parametrize(
    "options",
    [
        {"num_cpus": 0.5, "num_gpus": 0.25, "resources": {"custom": 2.5}},
        {"num_cpus": 0, "num_gpus": 2, "memory": 10**9},
        {"num_gpus": 1 / 3},
        {"num_returns": 0},
        {"num_returns": "streaming"},
        {"num_returns": "dynamic"},
        {"num_returns": None},
        {"max_retries": -1},
        {"retry_exceptions": [ValueError, KeyError]},
        {"retry_exceptions": (OSError,)},
        {"scheduling_strategy": "SPREAD"},
        {"scheduling_strategy": None},
        {"scheduling_strategy": NodeAffinitySchedulingStrategy("ab", soft=True)},
        {"scheduling_strategy": NodeLabelSchedulingStrategy({"k": In("v")})},
        {"scheduling_strategy": PlacementGroupSchedulingStrategy(_PG())},
        {"placement_group": _PG(), "placement_group_bundle_index": 0},
        {"placement_group": None, "scheduling_strategy": "SPREAD"},
        {"runtime_env": {"env_vars": {"A": "1"}}, "name": "f", "accelerator_type": "H100"},
        {"label_selector": {"zone": "in(a,b)"}, "_metadata": {"ns": {}}, "enable_task_events": False},
        {"object_store_memory": None, "max_calls": 5},
    ],
)
def test_valid_task_options(options):
    validate_task_options(options, in_options=False)


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"foo": 1}, "Invalid option keyword foo for remote functions"),
        ({"num_cpus": -1}, "negative"),
        ({"num_cpus": 0.00001}, "precision"),
        ({"num_gpus": -0.5}, "negative"),
        ({"num_gpus": 1.5}, "whole number"),
        ({"resources": {"CPU": 1}}, "num_cpus"),
        ({"resources": {"GPU": 1}}, "num_gpus"),
        ({"resources": {"memory": 1}}, "'memory' keyword"),
        ({"resources": {"object_store_memory": 1}}, "object_store_memory"),
        ({"resources": {"bundle": 1}}, "reserved"),
        ({"resources": {"x": -2}}, "negative"),
        ({"resources": {"x": "2"}}, "must be a number"),
        ({"num_returns": -1}, "num_returns"),
        ({"num_returns": "many"}, "num_returns"),
        ({"max_retries": -2}, "max_retries"),
        ({"max_calls": -1}, "max_calls"),
        ({"retry_exceptions": [ValueError, 3]}, "retry_exceptions"),
        ({"retry_exceptions": ["ValueError"]}, "retry_exceptions"),
        ({"scheduling_strategy": "RANDOM"}, "RANDOM"),
        ({"placement_group": "mine"}, "placement_group"),
        ({"placement_group_bundle_index": -2}, "placement_group_bundle_index"),
        ({"object_store_memory": 100}, "not implemented for tasks"),
        ({"label_selector": {"k": "in(a"}}, "label_selector"),
        ({"_generator_backpressure_num_objects": 0}, "_generator_backpressure_num_objects"),
        ({"placement_group": _PG(), "scheduling_strategy": "SPREAD"}, "scheduling_strategy"),
    ],
)
def test_invalid_task_option_values(options, needle):
    with pytest.raises(ValueError, match=needle):
        validate_task_options(options, in_options=False)


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"num_cpus": "1"}, "'num_cpus' must be a number or None, but received '1' of type str"),
        ({"num_cpus": True}, "num_cpus"),
        ({"max_retries": 1.5}, "max_retries"),
        ({"retry_exceptions": "yes"}, "retry_exceptions"),
        ({"resources": [("x", 1)]}, "resources"),
        ({"runtime_env": "env"}, "runtime_env"),
        ({"scheduling_strategy": 3}, "scheduling_strategy"),
        ({"enable_task_events": None}, "enable_task_events"),
        ({"placement_group_bundle_index": None}, "placement_group_bundle_index"),
    ],
)
def test_wrong_types_raise_value_and_type_error(options, needle):
    with pytest.raises(InvalidOptionTypeError, match=needle) as info:
        validate_task_options(options, in_options=False)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        validate_task_options({"num_cpu": 1}, in_options=False)
    assert "num_cpu" in str(info.value) and "'num_cpus'" in str(info.value)
    with pytest.raises(ValueError, match="for actors"):
        validate_actor_options({"max_retries": 1}, in_options=False)
    with pytest.raises(ValueError, match="for actor methods"):
        validate_method_options({"num_cpus": 1})


def test_max_calls_not_in_dot_options():
    validate_task_options({"max_calls": 1}, in_options=False)
    with pytest.raises(ValueError, match="max_calls"):
        validate_task_options({"max_calls": 1}, in_options=True)


def test_valid_actor_options():
    validate_actor_options(
        {
            "num_cpus": 2,
            "num_gpus": 1,
            "max_restarts": -1,
            "max_task_retries": -1,
            "max_concurrency": 8,
            "max_pending_calls": 10,
            "concurrency_groups": {"io": 2, "compute": 4},
            "name": "a",
            "namespace": "ns",
            "lifetime": "detached",
            "get_if_exists": True,
            "allow_out_of_order_execution": True,
            "runtime_env": None,
            "scheduling_strategy": "DEFAULT",
            "memory": 2**30,
        },
        in_options=False,
    )
    validate_actor_options({"lifetime": "non_detached", "max_concurrency": None}, in_options=True)


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"lifetime": "forever"}, "lifetime"),
        ({"max_restarts": -2}, "max_restarts"),
        ({"max_task_retries": -5}, "max_task_retries"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"max_pending_calls": -3}, "max_pending_calls"),
        ({"get_if_exists": True}, "get_if_exists"),
        ({"name": ""}, "name"),
        ({"namespace": ""}, "namespace"),
        ({"concurrency_groups": {"io": 0}}, "concurrency_groups"),
        ({"max_calls": 1}, "Invalid option keyword max_calls for actors"),
        ({"num_returns": 1}, "Invalid option keyword num_returns for actors"),
    ],
)
def test_invalid_actor_options(options, needle):
    with pytest.raises(ValueError, match=needle):
        validate_actor_options(options, in_options=False)


def test_actor_concurrency_groups_not_in_dot_options():
    with pytest.raises(ValueError, match="concurrency_groups"):
        validate_actor_options({"concurrency_groups": {"io": 1}}, in_options=True)


def test_actor_object_store_memory_warns():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        validate_actor_options({"object_store_memory": 100}, in_options=False)
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)


def test_method_options():
    validate_method_options(
        {"num_returns": 2, "concurrency_group": "io", "max_task_retries": -1,
         "retry_exceptions": [ValueError], "name": "m", "enable_task_events": False}
    )
    with pytest.raises(ValueError, match="concurrency_group"):
        validate_method_options({"concurrency_group": ""})
    with pytest.raises(ValueError, match="num_returns"):
        validate_method_options({"num_returns": -1})


def test_merge_options_metadata_per_namespace():
    base = {"num_cpus": 1, "_metadata": {"a": {"x": 1}, "b": {"y": 1}}}
    over = {"num_cpus": 2, "_metadata": {"a": {"z": 2}}}
    merged = merge_options(base, over)
    assert merged["num_cpus"] == 2
    assert merged["_metadata"] == {"a": {"x": 1, "z": 2}, "b": {"y": 1}}
    assert base["_metadata"] == {"a": {"x": 1}, "b": {"y": 1}}  # not mutated
    assert merge_options({"a": 1}, {}) == {"a": 1}


def test_task_resource_request():
    assert resource_request({}, for_actor=False) == ({"CPU": 1.0}, {"CPU": 1.0})
    assert resource_request(task_defaults(False), for_actor=False) == ({"CPU": 1.0}, {"CPU": 1.0})
    placement, held = resource_request(
        {"num_cpus": 0, "num_gpus": 0.5, "resources": {"tpu": 2, "zero": 0}, "memory": 1000,
         "accelerator_type": "A100"},
        for_actor=False,
    )
    assert placement == held == {"GPU": 0.5, "tpu": 2.0, "memory": 1000.0, "accelerator_type:A100": 0.001}


def test_actor_resource_request():
    # Nothing named: placed with 1 CPU, holds nothing.
    assert resource_request({}, for_actor=True) == ({"CPU": 1.0}, {})
    assert resource_request(actor_defaults(), for_actor=True) == ({"CPU": 1.0}, {})
    # Only memory named: still the default rule (Ray's quirk), memory held.
    assert resource_request({"memory": 100}, for_actor=True) == ({"memory": 100.0, "CPU": 1.0}, {"memory": 100.0})
    # Any resource named: hold num_cpus (default 1) plus the rest; placement equal.
    assert resource_request({"num_gpus": 1}, for_actor=True) == ({"GPU": 1.0, "CPU": 1.0}, {"GPU": 1.0, "CPU": 1.0})
    assert resource_request({"num_cpus": 2}, for_actor=True) == ({"CPU": 2.0}, {"CPU": 2.0})
    assert resource_request({"num_cpus": 0}, for_actor=True) == ({}, {})
    assert resource_request({"resources": {"x": 1}}, for_actor=True) == ({"x": 1.0, "CPU": 1.0}, {"x": 1.0, "CPU": 1.0})
    assert resource_request({"accelerator_type": "T4"}, for_actor=True)[1] == {
        "accelerator_type:T4": 0.001, "CPU": 1.0}


def test_scheduling_strategy_from_options():
    assert scheduling_strategy_from_options({}) == "DEFAULT"
    assert scheduling_strategy_from_options(task_defaults(False)) == "DEFAULT"
    assert scheduling_strategy_from_options({"scheduling_strategy": "SPREAD"}) == "SPREAD"
    pg = _PG()
    s = scheduling_strategy_from_options(
        {"placement_group": pg, "placement_group_bundle_index": 1, "placement_group_capture_child_tasks": True})
    assert s == PlacementGroupSchedulingStrategy(pg, 1, True)
    assert scheduling_strategy_from_options({"placement_group": None}) == "DEFAULT"
