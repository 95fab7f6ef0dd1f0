"""Semantic garbage for the wire fuzzer: valid requests with one field made wrong.

Each maker starts from a valid template (fuzz_cases), breaks exactly one
thing a correct sender never gets wrong, and returns the request together
with the strings the refusal must contain: the request type and the field
(by name or by its path in the request). Pickled fields get both kinds of
bad pickle: bytes that are no pickle at all, and pickles of the wrong thing.
"""
from __future__ import annotations

import math
import pickle
import random

from meshray.node import request_rules
from meshray.rpc import rules
from meshray.rpc.generated import meshray_pb2 as pb
from meshray.testing import fuzz_cases as fc

__all__ = ["semantic_case"]


def _not_pickle(rng: random.Random) -> bytes:
    return rng.choice([fc._bytes(rng, 1, 40), b"{}", b"\x80\x05\x95" + b"\xff" * 8 + b".",
                       pickle.dumps(((), {}), protocol=5)[:-1]])


def _nonempty_other(rng: random.Random, right: int) -> bytes:
    return fc._bytes(rng, *rng.choice([(1, right - 1), (right + 1, right + 40)]))


def _strategy_pickle_of_wrong_thing(rng: random.Random) -> bytes:
    return pickle.dumps(rng.choice([42, "DEFAULT", {"node_id": "x"}, [1]]), protocol=5)


def bad_spec(rng: random.Random, ctx: fc.Context, spec: pb.TaskSpec) -> str:
    """Break one field of a valid task/creation spec; return what the refusal names."""
    pick = rng.randrange(22)
    if pick == 0:
        spec.task_id = fc._other_length(rng, 16)
        return "task_id"
    if pick == 1:
        spec.function_id = fc._other_length(rng, 16)
        return "function_id"
    if pick == 2:
        spec.job_id = _nonempty_other(rng, 8)
        return "job_id"
    if pick == 3:
        spec.num_returns = rng.choice([-2, -2 ** 31, rules.MAX_NUM_RETURNS + 1, 2 ** 31 - 1])
        return "num_returns"
    if pick == 4:
        name, amount = rng.choice([("CPU", -1.0), ("CPU", math.nan), ("GPU", math.inf),
                                   ("CPU", 1e-9), ("", 1.0)])
        spec.resources[name] = amount
        return "resources"
    if pick == 5:
        spec.max_retries = rng.choice([-2, -2 ** 31])
        return "max_retries"
    if pick == 6:
        spec.attempt = rng.choice([-1, -2 ** 31])
        return "attempt"
    if pick == 7:
        spec.scheduling_strategy = rng.choice(["BOGUS", "default", "spread", "\0"])
        return "scheduling_strategy"
    if pick in (8, 9):
        spec.scheduling_strategy = rng.choice(request_rules.STRATEGY_CLASSES)
        spec.strategy_blob = (_not_pickle(rng) if pick == 8
                              else _strategy_pickle_of_wrong_thing(rng))
        return "strategy_blob"
    if pick == 10:
        spec.scheduling_strategy = rng.choice(["DEFAULT", "SPREAD", ""])
        spec.strategy_blob = pickle.dumps("DEFAULT")
        return "strategy_blob"
    if pick == 11:
        spec.runtime_env_json = rng.choice(["not json", "[1, 2]", '"text"', "{",
                                            '{"_packages": [1]}'])
        return "runtime_env_json"
    if pick == 12:
        key, value = rng.choice([("A=B", "1"), ("", "x"), ("K", "a\0b")])
        spec.env_vars[key] = value
        return "env_vars"
    if pick == 13:
        spec.args_blob = _not_pickle(rng)
        return "args_blob"
    if pick == 14:
        spec.retry_exceptions = True
        spec.retry_exception_types = _not_pickle(rng)
        return "retry_exception_types"
    if pick == 15:
        spec.retry_exceptions = False
        spec.retry_exception_types = pickle.dumps((ValueError,))
        return "retry_exception_types"
    if pick == 16:
        spec.arg_ref_ids.append(fc._other_length(rng, 20))
        return "arg_ref_ids"
    if pick == 17:
        spec.contained_ids.append(fc._other_length(rng, 20))
        return "contained_ids"
    if pick == 18:
        spec.owner_id = _nonempty_other(rng, 16)
        return "owner_id"
    if pick == 19:
        spec.parent_task_id = _nonempty_other(rng, 16)
        return "parent_task_id"
    if pick == 20:
        spec.args_image = True
        return "args_image"
    # An actor creation with one thing wrong.
    spec.actor_creation = True
    spec.actor_id = fc._task_id(rng, ctx)
    spec.num_returns = 1
    spec.actor_options = b'{"class_name": "Fuzz", "max_restarts": 0}'
    which = rng.randrange(4)
    if which == 0:
        spec.actor_options = rng.choice([b"{bad", b"[]", b'{"max_restarts": "x"}',
                                         b'{"lifetime": "forever"}', b'{"max_concurrency": 0}',
                                         b'{"concurrency_groups": {"io": -1}}'])
        return "actor_options"
    if which == 1:
        spec.num_returns = rng.choice([0, 2])
        return "num_returns"
    if which == 2:
        spec.actor_id = fc._other_length(rng, 16)
        return "actor_id"
    spec.actor_creation = False     # actor fields on a plain task
    return "actor_id"


def _value(rng: random.Random, ctx: fc.Context) -> pb.ObjectValue:
    return pb.ObjectValue(object_id=fc._object_id(rng, ctx), inline_data=pickle.dumps(1))


def bad_value(rng: random.Random, value: pb.ObjectValue) -> str:
    pick = rng.randrange(4)
    if pick == 0:
        value.object_id = fc._other_length(rng, 20)
        return "object_id"
    if pick == 1:
        value.inline_data = _not_pickle(rng)
        return "inline_data"
    if pick == 2:
        value.in_store, value.inline_data, value.size = True, b"", 100
        value.location = rng.choice(["zz", "ABCDEF" * 6, "0" * 31])
        return "location"
    value.contained_ids.append(fc._other_length(rng, 20))
    return "contained_ids"


def _bad_client_event(rng: random.Random, ctx: fc.Context) -> tuple:
    """(event, what the refusal names)."""
    pick = rng.randrange(16)
    if pick == 0:
        return pb.ClientEvent(), "no event set"
    if pick == 1:
        event = fc._hello(rng)
        event.hello.role = rng.choice(["overlord", "Driver", "", "worker\0"])
        return event, "role"
    if pick == 2:
        event = fc._hello(rng)
        event.hello.worker_id = fc._other_length(rng, 16)
        return event, "worker_id"
    if pick == 3:
        event = fc._hello(rng)
        event.hello.pid = rng.choice([0, -1, -2 ** 31])
        return event, "pid"
    if pick == 4:   # a worker this node never started (judged by the handler)
        event = fc._hello(rng)
        event.hello.role = "worker"
        return event, "worker_id"
    if pick == 5:
        function = pb.RegisterFunction(function_id=fc._bytes(rng, 16, 16), pickled=pickle.dumps(1))
        if rng.random() < 0.5:
            function.function_id = fc._other_length(rng, 16)
            return pb.ClientEvent(register_function=function), "function_id"
        function.pickled = rng.choice([b"", _not_pickle(rng)])
        return pb.ClientEvent(register_function=function), "pickled"
    if pick == 6:
        spec = fc.valid_task_spec(rng, ctx)
        name = bad_spec(rng, ctx, spec)
        return pb.ClientEvent(submit=pb.SubmitTask(spec=spec)), name
    if pick == 7:
        value = _value(rng, ctx)
        name = bad_value(rng, value)
        return pb.ClientEvent(put=pb.PutObject(value=value)), name
    if pick == 8:
        return pb.ClientEvent(reserve=pb.ReserveObject(
            request_id=1, object_id=fc._other_length(rng, 20), size=64)), "object_id"
    if pick == 9:
        return pb.ClientEvent(subscribe=pb.Subscribe(
            object_ids=[fc._object_id(rng, ctx), fc._other_length(rng, 20)])), "object_ids"
    if pick == 10:
        return pb.ClientEvent(refs=pb.RefUpdate(add=[fc._other_length(rng, 20)])), "add"
    if pick == 11:
        result = pb.TaskResult(task_id=fc._task_id(rng, ctx), returns=[_value(rng, ctx)])
        which = rng.randrange(3)
        if which == 0:
            result.task_id = fc._other_length(rng, 16)
            return pb.ClientEvent(task_result=result), "task_id"
        if which == 1:
            result.stream_item_id = fc._object_id(rng, ctx)
            del result.returns[:]
            return pb.ClientEvent(task_result=result), "returns"
        result.actor_address = rng.choice(["nowhere", "host:", ":80", "a:b:c:x"])
        return pb.ClientEvent(task_result=result), "actor_address"
    if pick == 12:
        return pb.ClientEvent(cancel=pb.CancelTask(object_id=fc._other_length(rng, 20))), \
            "object_id"
    if pick == 13:
        request = pb.Request(request_id=7, method="nodes", payload=b"{}")
        if rng.random() < 0.5:
            request.method = rng.choice(["no_such_question", "", "_ask_nodes", "Nodes"])
            return pb.ClientEvent(request=request), "method"
        request.payload = rng.choice([b"not json", b"[1]", b"\xff\xfe", b"7"])
        return pb.ClientEvent(request=request), "payload"
    if pick == 14 and ctx.actor_id:
        # The actor under test, named by a process that is not its worker.
        return pb.ClientEvent(actor_exiting=pb.ActorExiting(actor_id=ctx.actor_id,
                                                            reason="fuzz")), "actor_exiting"
    return pb.ClientEvent(actor_exiting=pb.ActorExiting(
        actor_id=fc._other_length(rng, 16))), "actor_id"


def _bad_peer_event(rng: random.Random, ctx: fc.Context) -> tuple:
    pick = rng.randrange(12)
    if pick == 0:
        return pb.PeerEvent(), "no event set"
    if pick == 1:
        spec = fc.valid_task_spec(rng, ctx)
        spill = pb.SpillTask(spec=spec, function_pickled=pickle.dumps(len),
                             args=[_value(rng, ctx) for _ in spec.arg_ref_ids])
        which = rng.randrange(3)
        if which == 0:
            what = bad_spec(rng, ctx, spill.spec)
            return pb.PeerEvent(spill=spill), what
        if which == 1:
            spill.args.append(_value(rng, ctx))
            return pb.PeerEvent(spill=spill), "args"
        spill.function_pickled = _not_pickle(rng)
        return pb.PeerEvent(spill=spill), "function_pickled"
    if pick == 2:
        return pb.PeerEvent(verdict=pb.SpillVerdict(task_id=fc._other_length(rng, 16))), \
            "task_id"
    if pick == 3:
        result = pb.TaskResult(task_id=fc._task_id(rng, ctx), returns=[_value(rng, ctx)])
        what = bad_value(rng, result.returns[0])   # before the event copies it
        return pb.PeerEvent(result=result), what
    if pick == 4:
        return pb.PeerEvent(subscribe=pb.Subscribe(object_ids=[fc._other_length(rng, 20)])), \
            "object_ids"
    if pick == 5:
        value = _value(rng, ctx)
        what = bad_value(rng, value)
        return pb.PeerEvent(ready=pb.ObjectReady(value=value)), what
    if pick == 6:
        return pb.PeerEvent(refs=pb.RefUpdate(remove=[fc._other_length(rng, 20)])), "remove"
    if pick == 7:
        method = rng.choice(["nodes", "no_such_question", "cluster_resources", ""])
        return pb.PeerEvent(request=pb.Request(request_id=3, method=method, payload=b"{}")), \
            "method"
    if pick == 8:
        return pb.PeerEvent(reply=pb.Reply(request_id=3, payload=b"{not json")), "payload"
    if pick == 9:
        return pb.PeerEvent(free=pb.FreeObjects(object_ids=[fc._other_length(rng, 20)])), \
            "object_ids"
    if pick == 10:
        return pb.PeerEvent(cancel_remote=pb.CancelTask(object_id=fc._other_length(rng, 20))), \
            "object_id"
    return pb.PeerEvent(container_freed=pb.ContainerFreed(
        container_id=fc._other_length(rng, 20))), "container_id"


def _bad_actor_call(rng: random.Random, ctx: fc.Context, spec: pb.TaskSpec) -> str:
    pick = rng.randrange(14)
    if pick == 0:
        spec.actor_id = rng.choice([fc._task_id(rng, ctx), fc._other_length(rng, 16)])
        return "actor_id"
    if pick == 1:
        spec.method_name = rng.choice(["no_such_method", "", "__init__", "__class__", "_private"])
        return "method_name"
    if pick == 2:
        spec.num_returns = rng.choice([-2, -2 ** 31, rules.MAX_NUM_RETURNS + 1])
        return "num_returns"
    if pick == 3:
        spec.actor_creation = True
        return "actor_creation"
    if pick == 4:
        spec.task_id = fc._other_length(rng, 16)
        return "task_id"
    if pick == 5:
        spec.args_blob = _not_pickle(rng)
        return "args_blob"
    if pick == 6:   # framed as a pickle, so it is found when the call runs
        spec.args_blob = rng.choice([pickle.dumps(42, protocol=5), pickle.dumps([1, 2]),
                                     pickle.dumps((1, 2)), pickle.dumps(((1,), [])),
                                     b"\x80\x05\xff."])
        return "args_blob"
    if pick == 7:
        spec.args_image = True
        spec.args_blob = rng.choice([fc._bytes(rng, 0, 80), b"MSHRAYOB" + b"\0" * 60])
        return "args_blob"
    if pick == 8:
        spec.args_image, spec.args_blob = True, b""
        spec.args_file = rng.choice(["../../etc/passwd", ".hidden", "a/b", "x\0y"])
        return "args_file"
    if pick == 9:
        spec.args_file = "arg-file"
        return "args_file"
    if pick == 10:
        spec.retry_exceptions = True
        spec.retry_exception_types = _not_pickle(rng)
        return "retry_exception_types"
    if pick == 11:
        spec.arg_ref_ids.append(fc._other_length(rng, 20))
        return "arg_ref_ids"
    if pick == 12:
        spec.parent_task_id = _nonempty_other(rng, 16)
        return "parent_task_id"
    spec.contained_ids.append(fc._other_length(rng, 20))
    return "contained_ids"


def semantic_case(request_class, rng: random.Random, ctx: fc.Context):
    """(request, strings its refusal must contain, note), or None for a type with none."""
    name = request_class.DESCRIPTOR.name
    full = request_class.DESCRIPTOR.full_name
    if name == "ClientBatch":
        batch = fc.client_template(rng, ctx)
        event, what = _bad_client_event(rng, ctx)
        batch.events.append(event)
        index = len(batch.events) - 1
        # A hello from an unknown worker and an exit said for someone else's
        # actor are judged by the node's handlers, which name the event kind.
        by_handler = (event.WhichOneof("kind") == "hello" and event.hello.role == "worker"
                      and len(event.hello.worker_id) == 16) or what == "actor_exiting"
        names = (what,) if by_handler else (full, f"events[{index}]", what)
        return batch, names, f"events[{index}] broken at {what}"
    if name == "PeerBatch":
        batch = fc.peer_template(rng, ctx)
        roll = rng.random()
        if roll < 0.1:
            batch.from_node = fc._other_length(rng, 16)
            return batch, (full, "from_node"), "from_node"
        if roll < 0.2:
            batch.load.available["CPU"] = rng.choice([-1.0, math.nan, math.inf])
            return batch, (full, "load.available"), "load.available"
        event, what = _bad_peer_event(rng, ctx)
        batch.events.append(event)
        index = len(batch.events) - 1
        return batch, (full, f"events[{index}]", what), f"events[{index}] broken at {what}"
    if name == "ActorCallBatch" and ctx.actor_id and ctx.actor_methods:
        batch = fc.actor_template(rng, ctx)
        if rng.random() < 0.1:
            batch.caller_id = _nonempty_other(rng, 16)
            return batch, (full, "caller_id"), "caller_id"
        index = rng.randrange(len(batch.calls))
        what = _bad_actor_call(rng, ctx, batch.calls[index])
        return batch, (what,), f"calls[{index}] broken at {what}"
    if name == "PullRequest":
        request = pb.PullRequest(object_id=fc._object_id(rng, ctx))
        if rng.random() < 0.5:
            request.object_id = fc._other_length(rng, 20)
            return request, (full, "object_id"), "object_id"
        request.chunk_size = rng.choice([1, request_rules.MIN_PULL_CHUNK - 1,
                                         request_rules.MAX_PULL_CHUNK + 1,
                                         2 ** 40])
        return request, (full, "chunk_size"), "chunk_size"
    return None
