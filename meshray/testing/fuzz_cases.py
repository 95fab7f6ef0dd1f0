"""The cases of the wire fuzzer: what to send to a method, and what must come back.

Methods come from the generated descriptors (`wire_methods`), so a method
added to proto/meshray.proto is fuzzed without touching this file: every
request type gets wire-level garbage, call-shape abuse and random well-typed
messages. Request types this file knows (the batches of Connect, Deliver and
Call, PullRequest, NodeInfoRequest) also get valid templates (controls: they
must be *accepted*, or the refusals below prove nothing) and field-by-field
semantic garbage, each naming the field the refusal must name.

Each case is drawn from ``Random(f"{seed}:{index}")`` alone, so one failing
case is reproduced from its seed and index without replaying the others.

Expectations:
- INVALID: garbage by construction; must be INVALID_ARGUMENT whose details
  contain every string in `names` (the message type, the field);
- UNIMPLEMENTED: a method the target does not serve;
- ACCEPTED: a valid template; must end with one of `accepted_codes`;
- CLEAR: a random message that may or may not be valid; any deliberate
  status will do, but not one that means the server broke (UNKNOWN,
  INTERNAL), hung (DEADLINE_EXCEEDED) or went away (UNAVAILABLE).
"""
from __future__ import annotations

import math
import os
import pickle
import random
from dataclasses import dataclass

from google.protobuf import message as protobuf_message

from meshray.rpc.generated import meshray_pb2 as pb

__all__ = ["Case", "Context", "WireMethod", "random_message", "template", "wire_garbage",
           "wire_methods"]

INVALID, UNIMPLEMENTED, ACCEPTED, CLEAR = "invalid", "unimplemented", "accepted", "clear"
SHAPES = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
# Never sent: a valid call to it ends the actor under test, as it should.
_FORBIDDEN_METHODS = ("__ray_terminate__",)
# Fields a tweak leaves alone because a valid value makes the request wait
# for ever by design: an actor call with a ref argument nobody will create
# waits for it (as a method that never returns would), and blocks a
# sequential actor's later calls. (request type, field full name)
WAITS_FOR_EVER = {("ActorCallBatch", "meshray.TaskSpec.arg_ref_ids")}
KINDS = {   # kind: weight
    "template": 8, "random_bytes": 10, "truncated": 9, "mutated": 11, "wrong_wire_type": 8,
    "unknown_field": 5, "huge_length": 6, "semantic": 18, "shape": 7, "unknown_method": 4,
    "random_valid": 8, "field_tweak": 10,
}


@dataclass(frozen=True)
class WireMethod:
    path: str                  # "/meshray.NodeService/Connect"
    service: str               # "meshray.NodeService"
    request_class: type
    client_streaming: bool
    server_streaming: bool

    @property
    def shape(self) -> str:
        return (f"{'stream' if self.client_streaming else 'unary'}_"
                f"{'stream' if self.server_streaming else 'unary'}")


def wire_methods(module=pb) -> list[WireMethod]:
    """Every method of every service in the generated module."""
    methods = []
    for service in module.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            methods.append(WireMethod(
                f"/{service.full_name}/{method.name}", service.full_name,
                getattr(module, method.input_type.name), method.client_streaming,
                method.server_streaming))
    return methods


@dataclass
class Context:
    """What a target's valid parts may name so that they look real."""
    node_id: bytes = b""            # ids the node owns start with its prefix
    actor_id: bytes = b""           # the actor under test (actor targets)
    actor_methods: tuple = ()       # its methods that are safe to call: f(x) -> x


@dataclass
class Case:
    index: int
    kind: str
    target: str
    method: str
    shape: str
    messages: list
    expect: str
    names: tuple = ()
    accepted_codes: tuple = ("OK",)
    note: str = ""

    def describe(self) -> str:
        sizes = ",".join(str(len(m)) for m in self.messages)
        return (f"case {self.index} [{self.kind}] {self.target} {self.method} as {self.shape} "
                f"with {len(self.messages)} message(s) ({sizes} bytes), expect {self.expect}"
                f"{' naming ' + repr(self.names) if self.names else ''}: {self.note}")


def wire_garbage(request_class, data: bytes) -> bool:
    """True when protobuf itself cannot take `data` as `request_class` cleanly:
    it does not decode, or holds unknown fields or a non-canonical encoding."""
    try:
        message = request_class.FromString(data)
    except (protobuf_message.DecodeError, RecursionError):
        return True
    message.DiscardUnknownFields()
    return message.ByteSize() != len(data)


# ------------------------------------------------------------------ wire helpers
def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


def _field_bytes(number: int, wire_type: int, rng: random.Random) -> bytes:
    if wire_type == 0:
        return _tag(number, 0) + _varint(rng.choice([0, 1, 150, 2 ** 31, 2 ** 63]))
    if wire_type == 1:
        return _tag(number, 1) + os.urandom(8)
    if wire_type == 5:
        return _tag(number, 5) + os.urandom(4)
    payload = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 12)))
    return _tag(number, 2) + _varint(len(payload)) + payload


def _declared_wire_type(field) -> int:
    if field.is_repeated and field.type not in (
            field.TYPE_STRING, field.TYPE_BYTES, field.TYPE_MESSAGE):
        return 2   # packed
    return {field.TYPE_DOUBLE: 1, field.TYPE_FIXED64: 1, field.TYPE_SFIXED64: 1,
            field.TYPE_FLOAT: 5, field.TYPE_FIXED32: 5, field.TYPE_SFIXED32: 5,
            field.TYPE_STRING: 2, field.TYPE_BYTES: 2, field.TYPE_MESSAGE: 2}.get(field.type, 0)


def _submessages(message, out: list) -> list:
    """Every message object inside `message` (itself included)."""
    out.append(message)
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].message_type is not None:
                for key in value:
                    _submessages(value[key], out)
        elif field.is_repeated:
            for item in value:
                _submessages(item, out)
        else:
            _submessages(value, out)
    return out


def _bytes(rng: random.Random, low: int = 0, high: int = 48) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(low, high)))


def _other_length(rng: random.Random, right: int) -> bytes:
    return _bytes(rng, *rng.choice([(0, 0), (1, right - 1), (right + 1, right + 40)]))


# ------------------------------------------------------------------ random messages
_STRINGS = ["", "driver", "worker", "DEFAULT", "SPREAD", "NodeAffinitySchedulingStrategy",
            "nodes", "actor_info", "echo", "__ray_ready__", "{}", "[]", '{"a": 1}', "\u00e9\u2713",
            "unix:/tmp/x.sock", "127.0.0.1:1", "x" * 300]
_DOUBLES = [0.0, 1.0, 0.5, -1.0, math.nan, math.inf, 1e300, 1e-9, 4.0]


def random_message(message_class, rng: random.Random, ctx: Context, depth: int = 0):
    """A well-typed `message_class` with random content (never a forbidden call)."""
    message = message_class()
    chosen_oneofs = {oneof.name: rng.choice([None, *oneof.fields])
                     for oneof in message_class.DESCRIPTOR.oneofs}
    for field in message_class.DESCRIPTOR.fields:
        if field.containing_oneof is not None:
            if chosen_oneofs[field.containing_oneof.name] is not field:
                continue
        elif rng.random() < 0.4:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            target = getattr(message, field.name)
            value_field = field.message_type.fields_by_name["value"]
            for _ in range(rng.randint(0, 3)):
                key = _scalar(field.message_type.fields_by_name["key"], rng, ctx)
                if value_field.message_type is None:
                    target[key] = _scalar(value_field, rng, ctx)
            continue
        count = rng.randint(0, 3) if field.is_repeated else 1
        for _ in range(count):
            if field.message_type is not None:
                if depth >= 4:
                    break
                child = random_message(getattr(pb, field.message_type.name), rng, ctx, depth + 1)
                if field.is_repeated:
                    getattr(message, field.name).append(child)
                else:
                    getattr(message, field.name).CopyFrom(child)
            elif field.is_repeated:
                getattr(message, field.name).append(_scalar(field, rng, ctx))
            else:
                setattr(message, field.name, _scalar(field, rng, ctx))
    if message_class is pb.TaskSpec and message.method_name in _FORBIDDEN_METHODS:
        message.method_name = "echo"
    return message


def set_random(holder, field, rng: random.Random, ctx: Context) -> None:
    """Give `field` of `holder` a random value of its type (an entry more, if repeated)."""
    value = getattr(holder, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        if value_field.message_type is None:
            value[_scalar(field.message_type.fields_by_name["key"], rng, ctx)] = \
                _scalar(value_field, rng, ctx)
    elif field.message_type is not None:
        child = random_message(getattr(pb, field.message_type.name), rng, ctx, depth=2)
        if field.is_repeated:
            value.append(child)
        else:
            value.CopyFrom(child)
    elif field.is_repeated:
        value.append(_scalar(field, rng, ctx))
    else:
        setattr(holder, field.name, _scalar(field, rng, ctx))
    if isinstance(holder, pb.TaskSpec) and holder.method_name in _FORBIDDEN_METHODS:
        holder.method_name = "echo"


def _scalar(field, rng: random.Random, ctx: Context):
    kind = field.type
    if kind == field.TYPE_BOOL:
        return rng.random() < 0.5
    if kind == field.TYPE_STRING:
        return rng.choice(_STRINGS + ["".join(chr(rng.randint(32, 126))
                                              for _ in range(rng.randint(1, 20)))])
    if kind == field.TYPE_BYTES:
        roll = rng.random()
        if roll < 0.3:
            return _bytes(rng, *rng.choice([(16, 16), (20, 20), (8, 8)]))
        if roll < 0.45 and ctx.node_id:
            return ctx.node_id[:6] + _bytes(rng, 10, 10) + rng.choice([b"", b"\0\0\0\1"])
        if roll < 0.6:
            return pickle.dumps(rng.choice([None, 1, "x", ((), {}), [1, 2]]), protocol=5)
        return _bytes(rng)
    if kind in (field.TYPE_DOUBLE, field.TYPE_FLOAT):
        return rng.choice(_DOUBLES)
    bits = 64 if kind in (field.TYPE_INT64, field.TYPE_UINT64, field.TYPE_SINT64,
                          field.TYPE_FIXED64, field.TYPE_SFIXED64) else 32
    unsigned = kind in (field.TYPE_UINT32, field.TYPE_UINT64, field.TYPE_FIXED32,
                        field.TYPE_FIXED64)
    value = rng.choice([0, 1, -1, 2, 7, 1000, 2 ** (bits - 1) - 1, -2 ** (bits - 1),
                        rng.randint(-1000, 1000)])
    return value % (2 ** bits) if unsigned else value


# ------------------------------------------------------------------ valid templates
def _object_id(rng: random.Random, ctx: Context) -> bytes:
    prefix = ctx.node_id[:6] if ctx.node_id else _bytes(rng, 6, 6)
    return prefix + _bytes(rng, 10, 10) + (rng.randint(1, 9)).to_bytes(4, "big")


def _task_id(rng: random.Random, ctx: Context) -> bytes:
    return _object_id(rng, ctx)[:16]


def valid_task_spec(rng: random.Random, ctx: Context) -> pb.TaskSpec:
    """A task that waits for an argument nobody will produce: it never runs,
    and is cancelled with its driver's session."""
    return pb.TaskSpec(
        task_id=_task_id(rng, ctx), job_id=_bytes(rng, 8, 8), function_id=_bytes(rng, 16, 16),
        name="fuzz.never_runs", args_blob=pickle.dumps(((), {}), protocol=5),
        arg_ref_ids=[_object_id(rng, ctx)], num_returns=rng.randint(0, 3),
        resources={"CPU": 1.0}, max_retries=rng.choice([-1, 0, 3]), owner_id=_bytes(rng, 16, 16))


def _hello(rng: random.Random) -> pb.ClientEvent:
    return pb.ClientEvent(hello=pb.Hello(role="driver", worker_id=_bytes(rng, 16, 16),
                                         pid=os.getpid(), job_id=_bytes(rng, 8, 8),
                                         namespace="fuzz"))


def client_template(rng: random.Random, ctx: Context) -> pb.ClientBatch:
    """A driver's session that leaves nothing lasting on the node."""
    events = [_hello(rng)]
    for _ in range(rng.randint(0, 4)):
        pick = rng.randrange(7)
        if pick == 0:
            events.append(pb.ClientEvent(subscribe=pb.Subscribe(
                object_ids=[_object_id(rng, ctx)])))
        elif pick == 1:
            events.append(pb.ClientEvent(refs=pb.RefUpdate(add=[_object_id(rng, ctx)],
                                                           remove=[_object_id(rng, ctx)])))
        elif pick == 2:
            events.append(pb.ClientEvent(request=pb.Request(
                request_id=rng.randint(1, 1000), method="nodes", payload=b"{}")))
        elif pick == 3:
            events.append(pb.ClientEvent(submit=pb.SubmitTask(spec=valid_task_spec(rng, ctx))))
        elif pick == 4:
            events.append(pb.ClientEvent(put=pb.PutObject(value=pb.ObjectValue(
                object_id=_object_id(rng, ctx), inline_data=pickle.dumps(rng.random())))))
        elif pick == 5:   # room it never writes: the node gives it back with the session
            events.append(pb.ClientEvent(reserve=pb.ReserveObject(
                request_id=rng.randint(1, 1000), object_id=_object_id(rng, ctx),
                size=rng.choice([64, 4096, 300 * 1024]))))
        else:
            events.append(pb.ClientEvent(cancel=pb.CancelTask(object_id=_object_id(rng, ctx))))
    return pb.ClientBatch(events=events)


def peer_template(rng: random.Random, ctx: Context) -> pb.PeerBatch:
    """A batch from a peer the node has never heard of, about objects nobody has."""
    events = []
    for _ in range(rng.randint(0, 3)):
        pick = rng.randrange(4)
        if pick == 0:
            events.append(pb.PeerEvent(refs=pb.RefUpdate(remove=[_object_id(rng, ctx)])))
        elif pick == 1:
            events.append(pb.PeerEvent(verdict=pb.SpillVerdict(task_id=_task_id(rng, ctx))))
        elif pick == 2:
            events.append(pb.PeerEvent(reply=pb.Reply(request_id=rng.randint(10 ** 6, 10 ** 7),
                                                      payload=b"{}")))
        else:
            events.append(pb.PeerEvent(cancel_remote=pb.CancelTask(
                object_id=_object_id(rng, ctx))))
    return pb.PeerBatch(from_node=_bytes(rng, 16, 16), events=events,
                        load=pb.NodeLoad(available={"CPU": 1.0}, backlog_room=1))


def actor_call(rng: random.Random, ctx: Context) -> pb.TaskSpec:
    value = rng.choice([1, "x", None, [1, 2.5], {"k": b"v"}])
    return pb.TaskSpec(task_id=_task_id(rng, ctx), actor_id=ctx.actor_id,
                       method_name=rng.choice(ctx.actor_methods), num_returns=1,
                       args_blob=pickle.dumps(((value,), {}), protocol=5),
                       sequence=rng.randint(1, 10 ** 6), name="fuzz.call")


def actor_template(rng: random.Random, ctx: Context) -> pb.ActorCallBatch:
    return pb.ActorCallBatch(calls=[actor_call(rng, ctx) for _ in range(rng.randint(1, 3))],
                             caller_id=_bytes(rng, 16, 16))


def template(request_class, rng: random.Random, ctx: Context):
    """(valid message, the codes that accept it), or None for a type with no template."""
    name = request_class.DESCRIPTOR.name
    if name == "ClientBatch":
        return client_template(rng, ctx), ("OK",)
    if name == "PeerBatch":
        return peer_template(rng, ctx), ("OK",)
    if name == "ActorCallBatch" and ctx.actor_id and ctx.actor_methods:
        return actor_template(rng, ctx), ("OK",)
    if name == "PullRequest":
        return pb.PullRequest(object_id=_object_id(rng, ctx)), ("NOT_FOUND",)
    if name == "NodeInfoRequest":
        return pb.NodeInfoRequest(), ("OK",)
    return None
