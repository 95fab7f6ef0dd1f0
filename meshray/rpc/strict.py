"""One protocol for malformed requests, on every meshray server.

A caller that holds the cluster token can still send bytes no correct
meshray process sends (a bug, a half-upgraded peer, a fuzzer). Such a request
is answered with INVALID_ARGUMENT and a message naming what was wrong, logged
(rate-limited), and never reaches the servicer's handlers, so nothing else on
the node changes because of it.

Servicers are registered with `add_service` instead of the generated
``add_*Servicer_to_server``. Every method is registered with raw bytes in and
a request-streaming shape, whatever its declared shape, so decoding is ours
rather than gRPC's (which answers undecodable bytes with UNKNOWN or INTERNAL,
waits for ever on a unary call that ends without a message, and ignores a
second one):

- bytes protobuf cannot decode, that carry fields this build does not know
  (a field sent with the wrong wire type lands there too), or that are not in
  protobuf's canonical encoding: Malformed, naming the message type and path;
- a unary method called with no request message, or with more than one;
- a decoded message the method's check refuses (the checks are built from
  meshray.rpc.rules: node/request_rules.py, core/call_rules.py);
- a servicer that raises Malformed itself while handling a request.

The token check and the chaos failpoints (meshray.rpc.factory) are server
interceptors and still run before any of this: a caller without the token
never gets its bytes decoded.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Callable

import grpc
import grpc.aio
from google.protobuf import message as protobuf_message
from google.protobuf import unknown_fields

from meshray.rpc.burst_log import BurstLog
from meshray.rpc.generated import meshray_pb2 as pb

__all__ = ["Malformed", "MalformedLog", "accept", "add_service", "decode"]

log = logging.getLogger(__name__)

_MISSING = object()


class Malformed(ValueError):
    """A request no correct meshray process sends; answered INVALID_ARGUMENT."""


def decode(message_class, data):
    """Decode `data` as `message_class`, strictly; Malformed says why not."""
    name = message_class.DESCRIPTOR.full_name
    try:
        message = message_class.FromString(data)
    except protobuf_message.DecodeError as exc:
        raise Malformed(f"{name}: {len(data)} bytes that do not decode ({exc})") from None
    except RecursionError:
        raise Malformed(f"{name}: {len(data)} bytes nested too deeply to decode") from None
    # Unknown fields are kept by the decoder and re-encoded by ByteSize, so
    # they are dropped before comparing: any difference is an unknown field
    # or a non-canonical encoding. The walk that names it runs only then.
    message.DiscardUnknownFields()
    if message.ByteSize() != len(data):
        raise Malformed(_encoding_problem(message_class, data))
    return message


def accept(message_class, data, check=None):
    """Decode `data` strictly and run `check` on it (servers not on gRPC:
    the call link); Malformed says why not, naming fields by their path."""
    message = decode(message_class, data)
    if check is not None:
        try:
            check(message)
        except Malformed as exc:
            raise Malformed(f"{message_class.DESCRIPTOR.full_name}.{exc}") from None
    return message


def _encoding_problem(message_class, data) -> str:
    name = message_class.DESCRIPTOR.full_name
    unknown = _first_unknown(message_class.FromString(data), "")
    if unknown is not None:
        path, type_name, number, wire_type = unknown
        where = f"{name}.{path} (a {type_name})" if path else name
        return (f"{where} has field number {number} with wire type {wire_type}: not a field "
                "of that message, or one sent with another wire type than its own")
    return (f"{name}: {len(data)} bytes not in canonical protobuf encoding (they re-encode "
            "differently: a field sent twice, an overlong varint or an explicit default)")


def _first_unknown(message, path: str):
    """(path, message type, field number, wire type) of the first unknown field."""
    for field in unknown_fields.UnknownFieldSet(message):
        return path, message.DESCRIPTOR.full_name, field.field_number, field.wire_type
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        name = f"{path}.{descriptor.name}" if path else descriptor.name
        if descriptor.message_type.GetOptions().map_entry:
            value_field = descriptor.message_type.fields_by_name["value"]
            items = [(f"{name}[{key!r}]", value[key]) for key in value] \
                if value_field.message_type is not None else []
        elif descriptor.is_repeated:
            items = [(f"{name}[{index}]", item) for index, item in enumerate(value)]
        else:
            items = [(name, value)]
        for item_path, item in items:
            found = _first_unknown(item, item_path)
            if found is not None:
                return found
    return None


def MalformedLog(burst: int = 20, window_s: float = 10.0) -> BurstLog:
    """The log of malformed requests refused."""
    return BurstLog(log, "refused a malformed request to %s from %s: %s",
                    "%d more malformed requests were refused in the last %.0fs "
                    "(not logged individually)", burst=burst, window_s=window_s)


@dataclass
class _Method:
    path: str                         # "/meshray.NodeService/Connect"
    request_class: type
    check: Callable | None
    unary_request: bool
    unary_response: bool
    # What a refused unary-response call returns alongside its status: the
    # thread-pool server serializes whatever is returned, and None fails that.
    refused_response: object = None

    def accept(self, data):
        return accept(self.request_class, data, self.check)

    def more_than_one(self) -> Malformed:
        return Malformed(f"exactly one {self.request_class.DESCRIPTOR.full_name} per call "
                         "expected; the call sent more than one")

    def none_sent(self) -> Malformed:
        return Malformed(f"exactly one {self.request_class.DESCRIPTOR.full_name} per call "
                         "expected; the call ended without sending one")


class _Problem:
    """The malformed request (if any) a call's decoding iterator ran into."""
    __slots__ = ("error",)

    def __init__(self):
        self.error: Malformed | None = None


def add_service(server, servicer, service: str, *, checks: dict | None = None,
                raw_responses=(), malformed_log: BurstLog | None = None) -> None:
    """Serve `service` ("meshray.NodeService") from `servicer` with strict requests.

    `checks` maps a method name to a function that raises Malformed for a
    decoded request it refuses. Methods in `raw_responses` return or yield
    already-encoded response bytes. Works for asyncio and thread-pool servers.
    """
    descriptor = pb.DESCRIPTOR.pool.FindServiceByName(service)
    checks = dict(checks or {})
    unknown = set(checks) - set(descriptor.methods_by_name)
    if unknown:
        raise ValueError(f"checks name methods {sorted(unknown)} that {service} does not have")
    report = malformed_log or MalformedLog()
    is_aio = isinstance(server, grpc.aio.Server)
    handlers = {}
    for method in descriptor.methods:
        raw = method.name in raw_responses
        response_class = getattr(pb, method.output_type.name)
        spec = _Method(f"/{service}/{method.name}",
                       getattr(pb, method.input_type.name), checks.get(method.name),
                       not method.client_streaming, not method.server_streaming,
                       b"" if raw else response_class())
        serializer = None if raw else response_class.SerializeToString
        behavior = getattr(servicer, method.name)
        build = _aio_behavior if is_aio else _sync_behavior
        wrapped = build(spec, behavior, report)
        if spec.unary_response:
            handlers[method.name] = grpc.stream_unary_rpc_method_handler(
                wrapped, request_deserializer=None, response_serializer=serializer)
        else:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                wrapped, request_deserializer=None, response_serializer=serializer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def _refuse(report: BurstLog, spec: _Method, context, error: Malformed) -> None:
    """Log the refusal and set the call's status; the wrapper then returns.

    The status is set rather than raised with context.abort: grpc.aio keeps
    memory behind for every aborted call (measured: about 1 KiB a call with
    the exception chain of a refusal), and a flood of garbage must not grow
    the server.
    """
    report.record(spec.path, context.peer(), str(error))
    context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
    context.set_details(f"malformed request to {spec.path}: {error}")


# ------------------------------------------------------------------ asyncio
def _aio_behavior(spec: _Method, behavior, report: BurstLog):
    async def one(request_iterator):
        first = _MISSING
        async for data in request_iterator:
            if first is not _MISSING:
                raise spec.more_than_one()
            first = spec.accept(data)   # refuse a bad first message before waiting on more
        if first is _MISSING:
            raise spec.none_sent()
        return first

    async def decoded(request_iterator, problem: _Problem):
        async for data in request_iterator:
            try:
                message = spec.accept(data)
            except Malformed as exc:
                problem.error = exc
                raise
            yield message

    if spec.unary_request and spec.unary_response:
        async def unary_unary(request_iterator, context):
            try:
                request = await one(request_iterator)
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result
            except Malformed as exc:
                _refuse(report, spec, context, exc)
                return spec.refused_response
        return unary_unary

    if spec.unary_request:
        async def unary_stream(request_iterator, context):
            try:
                request = await one(request_iterator)
                async for response in behavior(request, context):
                    yield response
            except Malformed as exc:
                _refuse(report, spec, context, exc)
        return unary_stream

    if spec.unary_response:
        async def stream_unary(request_iterator, context):
            problem = _Problem()
            result = None
            try:
                result = behavior(decoded(request_iterator, problem), context)
                result = await result if inspect.isawaitable(result) else result
            except Malformed as exc:
                problem.error = problem.error or exc
            except Exception:
                if problem.error is None:
                    raise
            if problem.error is not None:
                _refuse(report, spec, context, problem.error)
                return spec.refused_response
            return result
        return stream_unary

    async def stream_stream(request_iterator, context):
        problem = _Problem()
        try:
            async for response in behavior(decoded(request_iterator, problem), context):
                yield response
        except Malformed as exc:
            problem.error = problem.error or exc
        except Exception:
            if problem.error is None:
                raise
        if problem.error is not None:
            _refuse(report, spec, context, problem.error)
    return stream_stream


# ------------------------------------------------------------------ thread pool
def _sync_behavior(spec: _Method, behavior, report: BurstLog):
    def one(request_iterator):
        first = _MISSING
        for data in request_iterator:
            if first is not _MISSING:
                raise spec.more_than_one()
            first = spec.accept(data)
        if first is _MISSING:
            raise spec.none_sent()
        return first

    def decoded(request_iterator, problem: _Problem):
        for data in request_iterator:
            try:
                message = spec.accept(data)
            except Malformed as exc:
                problem.error = exc
                raise
            yield message

    if spec.unary_request and spec.unary_response:
        def unary_unary(request_iterator, context):
            try:
                return behavior(one(request_iterator), context)
            except Malformed as exc:
                _refuse(report, spec, context, exc)
                return spec.refused_response
        return unary_unary

    if spec.unary_request:
        def unary_stream(request_iterator, context):
            try:
                request = one(request_iterator)
                yield from behavior(request, context)
            except Malformed as exc:
                _refuse(report, spec, context, exc)
        return unary_stream

    if spec.unary_response:
        def stream_unary(request_iterator, context):
            problem = _Problem()
            result = None
            try:
                result = behavior(decoded(request_iterator, problem), context)
            except Malformed as exc:
                problem.error = problem.error or exc
            except Exception:
                if problem.error is None:
                    raise
            if problem.error is not None:
                _refuse(report, spec, context, problem.error)
                return spec.refused_response
            return result
        return stream_unary

    def stream_stream(request_iterator, context):
        problem = _Problem()
        try:
            yield from behavior(decoded(request_iterator, problem), context)
        except Malformed as exc:
            problem.error = problem.error or exc
        except Exception:
            if problem.error is None:
                raise
        if problem.error is not None:
            _refuse(report, spec, context, problem.error)
    return stream_stream
