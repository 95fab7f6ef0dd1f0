"""gRPC interceptors that carry out the membership proofs of :mod:`.auth`.

Servers: every call is checked on its metadata, which gRPC hands to a server
interceptor before it has read a single request message. A refused call is
answered by a handler that never reads its request stream, so neither
protobuf decoding nor pickle ever sees bytes from a caller who has not proved
membership. An accepted call's first act is to send the server's proof as
initial metadata. The check does not know service or method names, so a
service added later is covered the moment it is registered on a server from
the factory; unknown methods are answered ``UNAUTHENTICATED`` too, so probing
reveals nothing.

Channels: every call carries a fresh proof; a channel sends an empty
``Hello`` before its first call and checks the server's proof before any
request payload goes out; and every call's answer is checked before the
application reads a response message.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import threading

import grpc
import grpc.aio

from meshray.rpc.auth import (
    AUTH_METADATA_KEY,
    HELLO_METHOD,
    PROOF_METADATA_KEY,
    TARGET_METADATA_KEY,
    CallSigner,
    MembershipError,
    ProofChecker,
)
from meshray.rpc.burst_log import BurstLog

log = logging.getLogger("meshray.rpc.factory")

DENIED_DETAILS = ("missing or wrong meshray membership proof: the caller did not show it holds "
                  "this cluster's token")
HELLO_TIMEOUT_S = 10.0
_OWN_KEYS = (AUTH_METADATA_KEY, TARGET_METADATA_KEY, "meshray-token")


def RejectionLog(burst: int = 20, window_s: float = 10.0) -> BurstLog:
    """The log of calls refused for want of a valid membership proof."""
    return BurstLog(log, "rejected unauthenticated gRPC call to %s from %s: %s",
                    "%d more unauthenticated gRPC calls were rejected in the last %.0fs "
                    "(not logged individually)", burst=burst, window_s=window_s)


# ------------------------------------------------------------------ servers
def _deny_handler(real_handler, aio: bool, record):
    """A handler that refuses the call without reading its request.

    The request side is always streaming, whatever the real method is: a
    unary-request handler makes gRPC read (and hand over) the request
    message before the behaviour runs, which is work -- and payload
    handling -- an unauthenticated caller must not get. The response side
    copies the real method's shape so the framework's bookkeeping matches
    the caller's expectation; for an unknown method the stream shape fits
    any caller (the status is the same on the wire). The status is set, not
    raised with context.abort: grpc.aio keeps memory behind for every aborted
    call, and a flood of strangers must not grow the server.
    """
    unary = real_handler is not None and not real_handler.response_streaming

    def refuse(context):
        record(context.peer())
        context.set_code(grpc.StatusCode.UNAUTHENTICATED)
        context.set_details(DENIED_DETAILS)

    if aio and unary:
        async def deny_unary(_requests, context):
            refuse(context)
            return b""
        return grpc.stream_unary_rpc_method_handler(deny_unary)
    if aio:
        async def deny_stream(_requests, context):
            refuse(context)
        return grpc.stream_stream_rpc_method_handler(deny_stream)
    if unary:
        def deny_unary_sync(_requests, context):
            refuse(context)
            return b""
        return grpc.stream_unary_rpc_method_handler(deny_unary_sync)

    def deny_stream_sync(_requests, context):
        refuse(context)
        return iter(())
    return grpc.stream_stream_rpc_method_handler(deny_stream_sync)


def _handler_like(handler, behavior):
    """A method handler of `handler`'s shape and serializers running `behavior`."""
    kwargs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[
        (handler.request_streaming, handler.response_streaming)]
    return make(behavior, **kwargs)


def _inner(handler):
    return (handler.stream_stream or handler.stream_unary or handler.unary_stream
            or handler.unary_unary)


def _aio_proving(handler, proof: str):
    """`handler` with the server's proof sent before anything else."""
    inner = _inner(handler)
    metadata = ((PROOF_METADATA_KEY, proof),)
    if inspect.isasyncgenfunction(inner):
        async def streaming(argument, context):
            await context.send_initial_metadata(metadata)
            async for response in inner(argument, context):
                yield response
        return _handler_like(handler, streaming)

    async def behavior(argument, context):
        await context.send_initial_metadata(metadata)
        result = inner(argument, context)
        if inspect.isawaitable(result):
            result = await result
        return result
    return _handler_like(handler, behavior)


def _sync_proving(handler, proof: str):
    inner = _inner(handler)
    metadata = ((PROOF_METADATA_KEY, proof),)
    if handler.response_streaming:
        def streaming(argument, context):
            context.send_initial_metadata(metadata)
            yield from inner(argument, context)
        return _handler_like(handler, streaming)

    def behavior(argument, context):
        context.send_initial_metadata(metadata)
        return inner(argument, context)
    return _handler_like(handler, behavior)


def _hello_handler(aio: bool, proof: str):
    metadata = ((PROOF_METADATA_KEY, proof),)
    if aio:
        async def hello(_request, context):
            await context.send_initial_metadata(metadata)
            return b""
    else:
        def hello(_request, context):
            context.send_initial_metadata(metadata)
            return b""
    return grpc.unary_unary_rpc_method_handler(hello)


class AioGate(grpc.aio.ServerInterceptor):
    """Admit asyncio-server calls that carry a good membership proof."""

    def __init__(self, checker: ProofChecker):
        self.checker = checker
        self.rejections = RejectionLog()

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        reason, proof = self.checker.check(method, handler_call_details.invocation_metadata)
        real = await continuation(handler_call_details)
        if reason is None:
            if method == HELLO_METHOD:
                return _hello_handler(True, proof)
            return _aio_proving(real, proof) if real is not None else None
        rejections = self.rejections
        return _deny_handler(real, True, lambda peer: rejections.record(method, peer, reason))


class SyncGate(grpc.ServerInterceptor):
    """The thread-pool-server twin of AioGate (same rule, same moment)."""

    def __init__(self, checker: ProofChecker):
        self.checker = checker
        self.rejections = RejectionLog()

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        reason, proof = self.checker.check(method, handler_call_details.invocation_metadata)
        real = continuation(handler_call_details)
        if reason is None:
            if method == HELLO_METHOD:
                return _hello_handler(False, proof)
            return _sync_proving(real, proof) if real is not None else None
        rejections = self.rejections
        return _deny_handler(real, False, lambda peer: rejections.record(method, peer, reason))


# ----------------------------------------------------------------- channels
def _signed_metadata(metadata, auth, target) -> list:
    out = [item for item in (metadata or ()) if item[0] not in _OWN_KEYS]
    out.append(auth)
    out.append(target)
    return out


class _Details(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def _replace_metadata(details, metadata):
    if hasattr(details, "_replace"):
        return details._replace(metadata=metadata)
    return _Details(details.method, details.timeout, metadata, details.credentials,
                    getattr(details, "wait_for_ready", None),
                    getattr(details, "compression", None))


def _failed(call) -> bool:
    """True when `call` ended with an error (its own error then speaks for it)."""
    try:
        return call.done() and call.code() not in (None, grpc.StatusCode.OK)
    except Exception:  # noqa: BLE001 - a call that cannot say is not known to have failed
        return False


class SyncProofs(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor,
                 grpc.UnaryStreamClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Membership proofs on a blocking-API channel (one per channel)."""

    def __init__(self, secret: str, target: str, raw_channel: grpc.Channel):
        self._signer = CallSigner(secret, target)
        self._raw = raw_channel
        self._verified = False
        self._lock = threading.Lock()

    def _hello(self, timeout) -> None:
        """Prove the server before the first request payload leaves."""
        if self._verified:
            return
        with self._lock:
            if self._verified:
                return
            auth, target, expected = self._signer.sign(HELLO_METHOD)
            limit = HELLO_TIMEOUT_S if timeout is None else min(timeout, HELLO_TIMEOUT_S)
            _response, call = self._raw.unary_unary(HELLO_METHOD).with_call(
                b"", timeout=limit, metadata=[auth, target])
            why = self._signer.verdict(call.initial_metadata(), expected)
            if why is not None:
                raise MembershipError(self._signer.target, HELLO_METHOD, why)
            self._verified = True

    def _check(self, call, method: str, expected: str):
        why = self._signer.verdict(call.initial_metadata(), expected)
        if why is None:
            return call
        if _failed(call):
            return call
        call.cancel()
        raise MembershipError(self._signer.target, method, why)

    def _sign(self, details):
        auth, target, expected = self._signer.sign(details.method)
        return _replace_metadata(details, _signed_metadata(details.metadata, auth, target)), expected

    def intercept_unary_unary(self, continuation, details, request):
        self._hello(details.timeout)
        signed, expected = self._sign(details)
        return self._check(continuation(signed, request), details.method, expected)

    def intercept_unary_stream(self, continuation, details, request):
        self._hello(details.timeout)
        signed, expected = self._sign(details)
        return self._check(continuation(signed, request), details.method, expected)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        self._hello(details.timeout)
        signed, expected = self._sign(details)
        return self._check(continuation(signed, request_iterator), details.method, expected)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        self._hello(details.timeout)
        signed, expected = self._sign(details)
        return self._check(continuation(signed, request_iterator), details.method, expected)


class _AioState:
    """What the four asyncio interceptors of one channel share."""

    def __init__(self, secret: str, target: str):
        self.signer = CallSigner(secret, target)
        self.verified = False
        self.channel: grpc.aio.Channel | None = None   # set once the channel exists
        self._lock: asyncio.Lock | None = None

    def sign(self, details, method: str):
        auth, target, expected = self.signer.sign(method)
        metadata = grpc.aio.Metadata(*_signed_metadata(details.metadata, auth, target))
        return details._replace(metadata=metadata), expected

    async def hello(self, details, method: str) -> None:
        """Prove the server before the first request payload leaves."""
        if self.verified or method == HELLO_METHOD or self.channel is None:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if not self.verified:
                limit = (HELLO_TIMEOUT_S if details.timeout is None
                         else min(details.timeout, HELLO_TIMEOUT_S))
                await self.channel.unary_unary(HELLO_METHOD)(b"", timeout=limit)
                self.verified = True   # the Hello's own check raised if the proof was bad

    async def check(self, call, method: str, expected: str) -> None:
        why = self.signer.verdict(await call.initial_metadata(), expected)
        if why is None:
            return
        if call.done() and await call.code() != grpc.StatusCode.OK:
            return
        call.cancel()
        error = MembershipError(self.signer.target, method, why)
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAUTHENTICATED, grpc.aio.Metadata(),
                                   grpc.aio.Metadata(), details=error.details())

    async def intercept(self, continuation, details, request):
        method = details.method   # bytes on asyncio channels
        method = method.decode() if isinstance(method, bytes) else method
        await self.hello(details, method)
        signed, expected = self.sign(details, method)
        call = await continuation(signed, request)
        await self.check(call, method, expected)
        return call


# grpc.aio files an interceptor under the first arity it implements only, so
# the asyncio channel needs one small class per call shape.
class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, state: _AioState):
        self._state = state

    async def intercept_unary_unary(self, continuation, details, request):
        return await self._state.intercept(continuation, details, request)


class _AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, state: _AioState):
        self._state = state

    async def intercept_unary_stream(self, continuation, details, request):
        return await self._state.intercept(continuation, details, request)


class _AioStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, state: _AioState):
        self._state = state

    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await self._state.intercept(continuation, details, request_iterator)


class _AioStreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, state: _AioState):
        self._state = state

    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await self._state.intercept(continuation, details, request_iterator)


def aio_proofs(secret: str, target: str) -> tuple[_AioState, list]:
    """The shared state and the four interceptors of one asyncio channel.

    The caller sets ``state.channel`` to the channel built with them; its
    Hello goes through the same interceptors (exempt from the Hello rule).
    """
    state = _AioState(secret, target)
    return state, [_AioUnaryUnary(state), _AioUnaryStream(state), _AioStreamUnary(state),
                   _AioStreamStream(state)]
