"""What a well-formed request is (rpc/rules.py, node/request_rules.py,
core/call_rules.py) and strict decoding (rpc/strict.py).

Each refusal is checked for naming the field; each rule has a valid
counterpart that passes, so a rule that refuses everything fails here too.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import types

import pytest

from meshray.core import call_rules
from meshray.core import options as opts
from meshray.node import request_rules as node_rules
from meshray.rpc import rules, strict
from meshray.rpc.generated import meshray_pb2 as pb
from meshray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

NODE = bytes(range(16))
ACTOR = NODE[:6] + b"\x01" * 10
QUESTIONS = frozenset({"actor_info", "restore"}) | node_rules.CLUSTER_QUESTIONS


def _oid(n: int = 1) -> bytes:
    return NODE[:6] + b"\x02" * 10 + n.to_bytes(4, "big")


def _spec(**fields) -> pb.TaskSpec:
    spec = pb.TaskSpec(task_id=_oid()[:16], job_id=b"j" * 8, function_id=b"f" * 16,
                       args_blob=pickle.dumps(((1,), {}), protocol=5), num_returns=1,
                       arg_ref_ids=[_oid(2)], resources={"CPU": 1.0}, owner_id=b"o" * 16)
    for name, value in fields.items():
        if isinstance(getattr(spec, name), (bytes, str, int, float, bool)):
            setattr(spec, name, value)
        else:
            getattr(spec, name).update(value) if hasattr(getattr(spec, name), "update") \
                else getattr(spec, name).extend(value)
    return spec


def _submit(**fields) -> pb.ClientBatch:
    return pb.ClientBatch(events=[pb.ClientEvent(submit=pb.SubmitTask(spec=_spec(**fields)))])


def _refusal(check, message) -> str:
    with pytest.raises(strict.Malformed) as info:
        check(message)
    return str(info.value)


def _client(batch):
    return node_rules.check_client_batch(batch, QUESTIONS)


# ------------------------------------------------------------------ strict decoding
def test_decode_accepts_what_protobuf_encodes():
    batch = _submit()
    assert strict.decode(pb.ClientBatch, batch.SerializeToString()) == batch


@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"\x0a\x05abc", b"\x0a" + b"\xff" * 10])
def test_undecodable_bytes_name_the_type(data):
    error = _refusal(lambda d: strict.decode(pb.ClientBatch, d), data)
    assert "meshray.ClientBatch" in error and "do not decode" in error


def test_unknown_field_deep_inside_is_named_by_path():
    batch = _submit()
    batch.events[0].submit.spec.MergeFromString(b"\xb8\x3e\x01")   # field 999, varint
    error = _refusal(lambda d: strict.decode(pb.ClientBatch, d), batch.SerializeToString())
    assert "events[0].submit.spec" in error and "field number 999" in error


def test_known_field_with_wrong_wire_type_is_refused():
    batch = _submit()
    batch.events[0].submit.spec.MergeFromString(b"\x0d\x01\x02\x03\x04")  # task_id as fixed32
    error = _refusal(lambda d: strict.decode(pb.ClientBatch, d), batch.SerializeToString())
    assert "field number 1 with wire type 5" in error


def test_non_canonical_encoding_is_refused():
    data = pb.PullRequest(object_id=_oid()).SerializeToString()
    error = _refusal(lambda d: strict.decode(pb.PullRequest, d), data + data)  # field sent twice
    assert "canonical" in error


# ------------------------------------------------------------------ pickles
@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickles_of_every_protocol_are_framed(protocol):
    assert rules.pickle_problem(pickle.dumps({"x": list(range(100))}, protocol=protocol)) is None
    assert rules.pickle_problem(pickle.dumps(None, protocol=protocol)) is None


@pytest.mark.parametrize("blob", [b"", b"\x00", b"not a pickle", pickle.dumps(1, protocol=0),
                                  pickle.dumps(list(range(50)), protocol=5)[:-3],
                                  b"\x80\x05\x95" + b"\xff" * 8 + b"."])
def test_non_pickles_are_caught(blob):
    assert rules.pickle_problem(blob) is not None


# ------------------------------------------------------------------ tasks
def test_valid_submission_passes():
    _client(_submit())
    strategy = NodeAffinitySchedulingStrategy(node_id=NODE.hex(), soft=True)
    import cloudpickle
    _client(_submit(scheduling_strategy="NodeAffinitySchedulingStrategy",
                    strategy_blob=cloudpickle.dumps(strategy), runtime_env_json='{"a": 1}'))


@pytest.mark.parametrize("fields, named", [
    ({"task_id": b"short"}, "task_id"),
    ({"function_id": b""}, "function_id"),
    ({"job_id": b"abc"}, "job_id"),
    ({"num_returns": rules.MAX_NUM_RETURNS + 1}, "num_returns"),
    ({"num_returns": -2}, "num_returns"),
    ({"num_returns": -1, "dynamic_returns": True}, "num_returns"),
    ({"resources": {"CPU": -1.0}}, "resources"),
    ({"resources": {"CPU": math.nan}}, "resources"),
    ({"max_retries": -5}, "max_retries"),
    ({"scheduling_strategy": "BOGUS"}, "scheduling_strategy"),
    ({"scheduling_strategy": "NodeAffinitySchedulingStrategy", "strategy_blob": b"junk"},
     "strategy_blob"),
    ({"scheduling_strategy": "NodeAffinitySchedulingStrategy",
      "strategy_blob": pickle.dumps(42)}, "strategy_blob"),
    ({"strategy_blob": pickle.dumps("DEFAULT")}, "strategy_blob"),
    ({"runtime_env_json": "not json"}, "runtime_env_json"),
    ({"runtime_env_json": "[1]"}, "runtime_env_json"),
    ({"env_vars": {"A=B": "x"}}, "env_vars"),
    ({"args_blob": b"garbage"}, "args_blob"),
    ({"retry_exceptions": True, "retry_exception_types": b"junk"}, "retry_exception_types"),
    ({"arg_ref_ids": [b"x" * 19]}, "arg_ref_ids"),
    ({"owner_id": b"x"}, "owner_id"),
    ({"args_image": True}, "args_image"),
    ({"actor_creation": True, "actor_id": ACTOR, "actor_options": b"{bad"}, "actor_options"),
    ({"actor_creation": True, "actor_id": ACTOR, "actor_options": b'{"max_restarts": "x"}'},
     "max_restarts"),
    ({"actor_id": ACTOR}, "actor_id"),
])
def test_bad_task_fields_are_named(fields, named):
    error = _refusal(_client, _submit(**fields))
    assert "events[0].submit.spec" in error and named in error


def test_every_client_event_needs_a_kind_and_known_enums():
    assert "no event set" in _refusal(_client, pb.ClientBatch(events=[pb.ClientEvent()]))
    hello = pb.Hello(role="overlord", worker_id=b"w" * 16, pid=os.getpid())
    assert "role" in _refusal(_client, pb.ClientBatch(events=[pb.ClientEvent(hello=hello)]))
    for method, payload, named in [("no_such", b"{}", "method"), ("nodes", b"[]", "payload"),
                                   ("nodes", b"{x", "payload")]:
        batch = pb.ClientBatch(events=[pb.ClientEvent(request=pb.Request(
            method=method, payload=payload))])
        assert named in _refusal(_client, batch)
    _client(pb.ClientBatch(events=[pb.ClientEvent(request=pb.Request(
        method="nodes", payload=json.dumps({}).encode()))]))


def test_object_values_and_results():
    good = pb.ObjectValue(object_id=_oid(), inline_data=pickle.dumps(1))
    _client(pb.ClientBatch(events=[pb.ClientEvent(put=pb.PutObject(value=good))]))
    stored = pb.ObjectValue(object_id=_oid(), in_store=True, size=10, location="zz")
    assert "location" in _refusal(_client, pb.ClientBatch(events=[pb.ClientEvent(
        put=pb.PutObject(value=stored))]))
    item = pb.TaskResult(task_id=_oid()[:16], stream_item_id=_oid())
    assert "returns" in _refusal(_client, pb.ClientBatch(events=[pb.ClientEvent(
        task_result=item)]))


# ------------------------------------------------------------------ peers, pulls, actors
def test_peer_batches():
    good = pb.PeerBatch(from_node=NODE, load=pb.NodeLoad(available={"CPU": 2.0}),
                        events=[pb.PeerEvent(refs=pb.RefUpdate(add=[_oid()]))])
    node_rules.check_peer_batch(good, QUESTIONS - node_rules.CLUSTER_QUESTIONS)
    for batch, named in [
        (pb.PeerBatch(from_node=b"x"), "from_node"),
        (pb.PeerBatch(from_node=NODE, load=pb.NodeLoad(available={"CPU": -1.0})), "load"),
        (pb.PeerBatch(from_node=NODE, events=[pb.PeerEvent(request=pb.Request(
            method="nodes"))]), "method"),     # a cluster question is for local clients only
        (pb.PeerBatch(from_node=NODE, events=[pb.PeerEvent(spill=pb.SpillTask(
            spec=_spec()))]), "args"),         # one value per ref argument
    ]:
        assert named in _refusal(lambda b: node_rules.check_peer_batch(
            b, QUESTIONS - node_rules.CLUSTER_QUESTIONS), batch)


def test_pull_requests():
    node_rules.check_pull_request(pb.PullRequest(object_id=_oid(), chunk_size=1 << 20))
    assert "chunk_size" in _refusal(node_rules.check_pull_request,
                                    pb.PullRequest(object_id=_oid(), chunk_size=1))
    assert "object_id" in _refusal(node_rules.check_pull_request, pb.PullRequest())


def _call(**fields) -> pb.ActorCallBatch:
    spec = pb.TaskSpec(task_id=_oid()[:16], actor_id=ACTOR, method_name="echo", num_returns=1,
                       args_blob=pickle.dumps(((1,), {}), protocol=5))
    for name, value in fields.items():
        setattr(spec, name, value)
    return pb.ActorCallBatch(calls=[spec])


@pytest.mark.parametrize("fields, named", [
    ({"actor_id": NODE}, "actor_id"), ({"method_name": "nope"}, "method_name"),
    ({"num_returns": -2}, "num_returns"), ({"actor_creation": True}, "actor_creation"),
    ({"num_returns": 2, "dynamic_returns": True}, "num_returns"),
    ({"args_image": True, "args_blob": b"", "args_file": "../../x"}, "args_file"),
    ({"args_file": "name"}, "args_file"),
])
def test_actor_calls(fields, named):
    check = lambda b: call_rules.check_actor_call_batch(b, ACTOR, {"echo"})  # noqa: E731
    check(_call())
    assert named in _refusal(check, _call(**fields))


@pytest.mark.parametrize("fields, why", [
    ({"args_blob": b"junk"}, "protocol 2 to 5 header"),
    ({"args_blob": pickle.dumps(42)}, "(args, kwargs) pair, got a int"),
    ({"args_blob": pickle.dumps(((1,), [1]))}, "(args, kwargs) pair, got a tuple"),
    ({"args_blob": b"\x80\x05\xff."}, "UnpicklingError"),
    ({"args_image": True, "args_blob": b"MSHRAYOB" + b"\0" * 60}, "not an object image"),
])
def test_actor_call_arguments_are_checked_when_loaded(fields, why):
    """Argument bytes are read (and copied) only when the call runs: checked there."""
    from meshray.core.actor_host import ActorHost
    host = types.SimpleNamespace(_arg_images={})
    assert ActorHost.load_args(host, _call().calls[0]) == ((1,), {})
    with pytest.raises(strict.Malformed) as info:
        ActorHost.load_args(host, _call(**fields).calls[0])
    assert "args_blob" in str(info.value) and why in str(info.value)


# ------------------------------------------------------------------ the API agrees
def test_num_returns_bound_is_refused_by_the_api_first():
    with pytest.raises(ValueError, match="num_returns"):
        opts.validate_task_options({"num_returns": rules.MAX_NUM_RETURNS + 1}, in_options=True)
    opts.validate_task_options({"num_returns": rules.MAX_NUM_RETURNS}, in_options=True)


def test_malformed_log_is_rate_limited(caplog):
    refusals = strict.MalformedLog(burst=3, window_s=3600)
    with caplog.at_level(logging.WARNING, logger="meshray.rpc.strict"):
        for _ in range(50):
            refusals.record("/meshray.NodeSession/Connect", "ipv4:1.2.3.4:5", "bad")
    lines = [r for r in caplog.records if "refused a malformed request" in r.getMessage()]
    assert len(lines) == 3
    assert "/meshray.NodeSession/Connect" in lines[0].getMessage()


def _pushed(lease_id=b"L" * 16, functions=(), **fields) -> pb.ActorCallBatch:
    spec = pb.TaskSpec(task_id=_oid()[:16], function_id=b"f" * 16, num_returns=1,
                       args_blob=pickle.dumps(((1,), {}), protocol=5))
    for name, value in fields.items():
        setattr(spec, name, value)
    return pb.ActorCallBatch(calls=[spec], lease_id=lease_id, functions=list(functions))


@pytest.mark.parametrize("batch, named", [
    (_pushed(lease_id=b""), "lease_id"), (_pushed(lease_id=b"short"), "lease_id"),
    (_pushed(actor_id=ACTOR), "actor_id"), (_pushed(method_name="echo"), "actor_id"),
    (_pushed(function_id=b"f"), "function_id"), (_pushed(num_returns=-1), "num_returns"),
    (_pushed(args_image=True), "args_file"),
    (_pushed(functions=[pb.RegisterFunction(function_id=b"f" * 16, pickled=b"junk")]),
     "pickled"),
    (_pushed(functions=[pb.RegisterFunction(function_id=b"f", pickled=pickle.dumps(len))]),
     "function_id"),
])
def test_tasks_pushed_on_a_lease(batch, named):
    """A leased worker runs only plain tasks under a lease id (core/lease_host.py)."""
    call_rules.check_lease_call_batch(_pushed(functions=[pb.RegisterFunction(
        function_id=b"f" * 16, pickled=pickle.dumps(len))]))
    assert named in _refusal(call_rules.check_lease_call_batch, batch)


def test_a_leased_workers_task_report():
    good = dict(task_id=b"t" * 16, name="f", max_retries=3, attempt=0)
    _client(pb.ClientBatch(events=[pb.ClientEvent(leased_task=pb.LeasedTask(**good))]))
    for bad, named in (({"task_id": b"t"}, "task_id"), ({"name": "x" * 2000}, "name"),
                       ({"max_retries": -2}, "max_retries"), ({"attempt": -1}, "attempt")):
        assert named in _refusal(_client, pb.ClientBatch(events=[pb.ClientEvent(
            leased_task=pb.LeasedTask(**{**good, **bad}))]))


def test_only_a_worker_says_where_it_serves_leases():
    hello = dict(role="worker", worker_id=b"w" * 16, pid=5)
    _client(pb.ClientBatch(events=[pb.ClientEvent(hello=pb.Hello(
        **hello, call_address="unix:/s/worker.sock"))]))
    for bad in ({**hello, "call_address": "127.0.0.1:5"},
                {**hello, "role": "driver", "call_address": "unix:/s/w.sock"},
                {**hello, "call_address": "unix:" + "x" * 5000}):
        assert "call_address" in _refusal(_client, pb.ClientBatch(events=[pb.ClientEvent(
            hello=pb.Hello(**bad))]))


def test_a_generator_call_streams_with_num_returns_minus_one():
    """An actor call whose method is a generator streams its items: num_returns -1."""
    call_rules.check_actor_call_batch(_call(num_returns=-1), ACTOR, {"echo"})
    call_rules.check_actor_call_batch(_call(dynamic_returns=True), ACTOR, {"echo"})
