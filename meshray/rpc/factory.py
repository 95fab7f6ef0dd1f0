"""The single seam through which every gRPC channel and server is built.

Keeping construction in one place means deadlines, keepalive, message limits,
TLS and the membership check cannot be forgotten by one caller: a server
built here refuses a call without a valid membership proof before any
handler (and so any unpickling) runs and proves itself to every caller it
admits; a channel built here proves membership on every call, never sends
the cluster secret itself, and reads no answer from a server that has not
proved membership (see :mod:`meshray.rpc.auth` for the exchange and
:mod:`meshray.rpc.gate` for where it is enforced).

TLS is optional and configured per call (``tls=TlsConfig``) or, by default,
from the MESHRAY_TLS_* environment so that worker processes inherit what
their node daemon was started with (see :mod:`meshray.rpc.tls`).
"""
from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import os
import random
import re
import socket
import threading
import time

import grpc
import grpc.aio

from meshray.rpc import limits
from meshray.rpc.auth import ProofChecker
from meshray.rpc.gate import AioGate, SyncGate, SyncProofs, aio_proofs
from meshray.rpc.tls import TLS_FROM_ENV, TlsConfig, resolve_tls

__all__ = [
    "FAILPOINTS_ENV",
    "FAILPOINTS_FILE_ENV",
    "FAILPOINT_METHODS",
    "MAX_MESSAGE_BYTES",
    "TLS_FROM_ENV",
    "TlsConfig",
    "accept_targets",
    "is_loopback_host",
    "make_aio_channel",
    "make_aio_server",
    "make_channel",
    "make_server",
    "parse_failpoints",
    "split_host_port",
]

log = logging.getLogger(__name__)

# Large values travel through the object store, not messages; this bound only
# has to admit inline values (<= 100 KiB each) batched together.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024

_COMMON_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
# Servers must accept the clients' keepalive pings (else GOAWAY too_many_pings).
_SERVER_OPTIONS = _COMMON_OPTIONS + [
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]


def split_host_port(address: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 in brackets allowed) with a clear error."""
    text = address.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address {address!r} is not of the form HOST:PORT")
    return host, int(port)


def join_host_port(host: str, port: int) -> str:
    """"host:port", with an IPv6 host in brackets (split_host_port's inverse)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback_host(host: str) -> bool:
    """True when binding `host` only exposes the port to this machine."""
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback
                       for info in socket.getaddrinfo(host, None))
        except OSError:
            return False


def _check_token(token) -> str | None:
    """Normalise a token argument; an empty one means "no token".

    gRPC metadata values must be printable ASCII, and a token with spaces or
    a trailing newline would silently never match a token read (stripped)
    from a file, so both are refused here with the reason.
    """
    if token is None or token == "":
        return None
    if not isinstance(token, str):
        raise TypeError(f"token must be a str or None, got {type(token).__name__}")
    if not all(0x21 <= ord(ch) <= 0x7E for ch in token):
        raise ValueError("token must consist of printable ASCII characters without spaces "
                         "(it travels as gRPC metadata); generate one with "
                         "meshray.security.generate_token()")
    return token


# ---------------------------------------------------------------- failpoints
# Fault injection for the chaos suite (chaos/): named RPCs can be delayed or
# dropped on the server side. Nothing here runs unless MESHRAY_FAILPOINTS or
# MESHRAY_FAILPOINTS_FILE is set when the server is built -- without them no
# interceptor is installed, so production calls pay nothing.
#
#   MESHRAY_FAILPOINTS="peer.deliver=delay(200ms,0.5);actor.call=drop(0.1)"
#   MESHRAY_FAILPOINTS_FILE=/path   same syntax, re-read when the file changes,
#                                   so a test can switch faults on and off in
#                                   processes that are already running
#
# Actions: delay(D[,P]) waits D (e.g. 200ms, 1.5s) before the request reaches
# its handler; drop(P) fails the call with UNAVAILABLE before the handler sees
# it (the request is lost); drop_reply(P) lets the handler run and fails the
# call instead of answering (the reply is lost). P is a probability (default
# 1). On a streaming request each message rolls the dice and a drop ends the
# whole stream with UNAVAILABLE.
FAILPOINTS_ENV = "MESHRAY_FAILPOINTS"
FAILPOINTS_FILE_ENV = "MESHRAY_FAILPOINTS_FILE"
FAILPOINT_METHODS = {
    "/meshray.NodePeer/Deliver": "peer.deliver",
    "/meshray.NodePeer/PullObject": "peer.pull",
    "/meshray.ActorService/Call": "actor.call",
    "/meshray.NodeSession/Connect": "node.connect",
    "/meshray.NodeService/GetNodeInfo": "node.info",
}
_FAILPOINT_ACTIONS = ("delay", "drop", "drop_reply")
_FAILPOINT_RE = re.compile(r"^\s*([\w./-]+)\s*=\s*(\w+)\s*\(([^)]*)\)\s*$")


def _duration(text: str) -> float:
    text = text.strip()
    for suffix, scale in (("ms", 1e-3), ("s", 1.0)):
        if text.endswith(suffix):
            return float(text[:-len(suffix)]) * scale
    return float(text)


def parse_failpoints(spec: str) -> dict[str, tuple[str, float, float]]:
    """Parse a failpoint spec into {name: (action, probability, delay_s)}.

    Names are the short names of FAILPOINT_METHODS or full method paths
    ("/pkg.Service/Method"). A malformed spec is a ValueError naming the
    offending part: a typo must not silently disable the fault a test needs.
    """
    rules: dict[str, tuple[str, float, float]] = {}
    for part in (spec or "").split(";"):
        if not part.strip():
            continue
        match = _FAILPOINT_RE.match(part)
        if match is None:
            raise ValueError(f"bad failpoint {part.strip()!r}: expected NAME=ACTION(ARGS), "
                             f"e.g. peer.deliver=delay(200ms,0.5)")
        name, action, args = match.group(1), match.group(2), [
            a for a in match.group(3).split(",") if a.strip()]
        if name not in FAILPOINT_METHODS.values() and not name.startswith("/"):
            raise ValueError(f"unknown failpoint {name!r}; known: "
                             f"{sorted(FAILPOINT_METHODS.values())} or a /pkg.Service/Method path")
        if action not in _FAILPOINT_ACTIONS:
            raise ValueError(f"unknown failpoint action {action!r} in {part.strip()!r}; "
                             f"known: {', '.join(_FAILPOINT_ACTIONS)}")
        try:
            if action == "delay":
                if not 1 <= len(args) <= 2:
                    raise ValueError("delay takes (DURATION[,PROBABILITY])")
                delay, probability = _duration(args[0]), float(args[1]) if len(args) > 1 else 1.0
            else:
                if len(args) > 1:
                    raise ValueError(f"{action} takes ([PROBABILITY])")
                delay, probability = 0.0, float(args[0]) if args else 1.0
        except ValueError as exc:
            raise ValueError(f"bad failpoint {part.strip()!r}: {exc}") from None
        if not 0.0 <= probability <= 1.0 or delay < 0:
            raise ValueError(f"bad failpoint {part.strip()!r}: probability must be in [0, 1] "
                             "and the delay not negative")
        rules[name] = (action, probability, delay)
    return rules


class _Failpoints:
    """The rules in force in this process, from the environment or a file.

    The file is stat()ed at most every 100 ms, so switching a fault on or off
    takes effect within that; a file that fails to parse keeps the previous
    rules (and says so in the log) rather than killing a running server.
    """

    def __init__(self):
        self._path = os.environ.get(FAILPOINTS_FILE_ENV) or None
        self._rules = parse_failpoints(os.environ.get(FAILPOINTS_ENV, ""))
        self._static = dict(self._rules)
        self._checked = 0.0
        self._mtime = None
        self._lock = threading.Lock()
        seed = os.environ.get("MESHRAY_FAILPOINTS_SEED")
        self.rng = random.Random(f"{seed}:{os.getpid()}" if seed else None)

    def rule(self, method: str):
        if self._path is not None and time.monotonic() - self._checked > 0.1:
            self._reload()
        rules = self._rules
        return rules.get(method) or rules.get(FAILPOINT_METHODS.get(method, ""))

    def _reload(self) -> None:
        with self._lock:
            self._checked = time.monotonic()
            try:
                mtime = os.stat(self._path).st_mtime_ns
            except OSError:
                mtime = None
            if mtime == self._mtime:
                return
            self._mtime = mtime
            try:
                text = open(self._path).read() if mtime is not None else ""
                self._rules = {**self._static, **parse_failpoints(text)}
            except (OSError, ValueError) as exc:
                log.warning("ignoring failpoint file %s: %s", self._path, exc)

    def roll(self, method: str, actions) -> tuple[str, float] | None:
        """(action, delay) when a rule for `method` fires now, else None."""
        rule = self.rule(method)
        if rule is None or rule[0] not in actions or self.rng.random() >= rule[1]:
            return None
        return rule[0], rule[2]


def _failpoints_wanted() -> bool:
    return bool(os.environ.get(FAILPOINTS_ENV) or os.environ.get(FAILPOINTS_FILE_ENV))


def _failpoint_details(method: str, what: str) -> str:
    return f"failpoint {FAILPOINT_METHODS.get(method, method)}: {what}"


def _rebuild_handler(handler, unary_unary=None, unary_stream=None, stream_unary=None,
                     stream_stream=None):
    kwargs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)
    if stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)
    if unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)


class _SyncFailpoints(grpc.ServerInterceptor):
    """Failpoints for thread-pool servers (actor workers)."""

    def __init__(self, points: _Failpoints):
        self._points = points

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or self._points.rule(method) is None and self._points._path is None:
            return handler
        points = self._points

        def before(context):
            fired = points.roll(method, ("delay", "drop"))
            if fired and fired[0] == "delay":
                time.sleep(fired[1])
            elif fired:
                context.abort(grpc.StatusCode.UNAVAILABLE, _failpoint_details(method, "dropped"))
            return points.roll(method, ("drop_reply",)) is not None

        def requests(iterator, state):
            for message in iterator:
                fired = points.roll(method, _FAILPOINT_ACTIONS)
                if fired and fired[0] == "delay":
                    time.sleep(fired[1])
                elif fired and fired[0] == "drop":
                    state["abort"] = "dropped a request message"
                    raise ConnectionAbortedError(_failpoint_details(method, "dropped"))
                elif fired:
                    state["drop_reply"] = True
                yield message

        def abort_if_needed(context, state, default: str) -> None:
            if state.get("abort") or state.pop("drop_reply", False):
                context.abort(grpc.StatusCode.UNAVAILABLE, _failpoint_details(
                    method, state.get("abort") or default))

        def replies(responses, state, context):
            try:
                for response in responses:
                    abort_if_needed(context, state, "dropped a reply")
                    yield response
            except Exception:
                if state.get("abort"):   # the handler let the dropped stream's error out
                    abort_if_needed(context, state, "")
                raise
            if state.get("abort"):
                abort_if_needed(context, state, "")

        if not handler.request_streaming:
            inner = handler.unary_stream if handler.response_streaming else handler.unary_unary

            def unary_request(request, context):
                lose_reply = before(context)
                result = inner(request, context)
                if lose_reply:
                    context.abort(grpc.StatusCode.UNAVAILABLE,
                                  _failpoint_details(method, "dropped the reply"))
                return result

            def unary_request_stream(request, context):
                state = {"drop_reply": before(context)}
                yield from replies(inner(request, context), state, context)

            if handler.response_streaming:
                return _rebuild_handler(handler, unary_stream=unary_request_stream)
            return _rebuild_handler(handler, unary_unary=unary_request)

        inner = handler.stream_stream if handler.response_streaming else handler.stream_unary

        def stream_request(iterator, context):
            state = {}
            try:
                result = inner(requests(iterator, state), context)
            except Exception:
                abort_if_needed(context, state, "")
                raise
            abort_if_needed(context, state, "dropped the reply")
            return result

        def stream_request_stream(iterator, context):
            state = {}
            yield from replies(inner(requests(iterator, state), context), state, context)

        if handler.response_streaming:
            return _rebuild_handler(handler, stream_stream=stream_request_stream)
        return _rebuild_handler(handler, stream_unary=stream_request)


class _AioFailpoints(grpc.aio.ServerInterceptor):
    """Failpoints for asyncio servers (node daemons); same rules as the sync twin."""

    def __init__(self, points: _Failpoints):
        self._points = points

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or self._points.rule(method) is None and self._points._path is None:
            return handler
        points = self._points

        async def before(context):
            fired = points.roll(method, ("delay", "drop"))
            if fired and fired[0] == "delay":
                await asyncio.sleep(fired[1])
            elif fired:
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    _failpoint_details(method, "dropped"))
            return points.roll(method, ("drop_reply",)) is not None

        async def requests(iterator, state):
            async for message in iterator:
                fired = points.roll(method, _FAILPOINT_ACTIONS)
                if fired and fired[0] == "delay":
                    await asyncio.sleep(fired[1])
                elif fired and fired[0] == "drop":
                    state["abort"] = "dropped a request message"
                    raise ConnectionAbortedError(_failpoint_details(method, "dropped"))
                elif fired:
                    state["drop_reply"] = True
                yield message

        async def abort_if_needed(context, state, default: str) -> None:
            if state.get("abort") or state.pop("drop_reply", False):
                await context.abort(grpc.StatusCode.UNAVAILABLE, _failpoint_details(
                    method, state.get("abort") or default))

        async def replies(behavior, argument, context, state):
            try:
                if inspect.isasyncgenfunction(behavior):
                    async for response in behavior(argument, context):
                        await abort_if_needed(context, state, "dropped a reply")
                        yield response
                else:   # a coroutine that writes its replies through the context
                    await behavior(argument, context)
            except Exception:
                if state.get("abort"):   # the handler let the dropped stream's error out
                    await abort_if_needed(context, state, "")
                raise
            if state.get("abort"):
                await abort_if_needed(context, state, "")

        if not handler.request_streaming:
            inner = handler.unary_stream if handler.response_streaming else handler.unary_unary

            async def unary_request(request, context):
                lose_reply = await before(context)
                result = inner(request, context)
                if inspect.isawaitable(result):
                    result = await result
                if lose_reply:
                    await context.abort(grpc.StatusCode.UNAVAILABLE,
                                        _failpoint_details(method, "dropped the reply"))
                return result

            async def unary_request_stream(request, context):
                state = {"drop_reply": await before(context)}
                async for response in replies(inner, request, context, state):
                    yield response

            if handler.response_streaming:
                return _rebuild_handler(handler, unary_stream=unary_request_stream)
            return _rebuild_handler(handler, unary_unary=unary_request)

        inner = handler.stream_stream if handler.response_streaming else handler.stream_unary

        async def stream_request(iterator, context):
            state = {}
            try:
                result = inner(requests(iterator, state), context)
                if inspect.isawaitable(result):
                    result = await result
            except Exception:
                await abort_if_needed(context, state, "")
                raise
            await abort_if_needed(context, state, "dropped the reply")
            return result

        async def stream_request_stream(iterator, context):
            state = {}
            async for response in replies(inner, requests(iterator, state), context, state):
                yield response

        if handler.response_streaming:
            return _rebuild_handler(handler, stream_stream=stream_request_stream)
        return _rebuild_handler(handler, stream_unary=stream_request)


def _check_binds(bind: list[str], token: str | None, allow_insecure_remote: bool) -> None:
    """Refuse an open listener before any server object exists."""
    if isinstance(bind, str):
        raise TypeError(f"bind must be a list of addresses, got the string {bind!r}")
    for address in bind:
        if address.startswith("unix:"):
            continue
        host, _port = split_host_port(address)
        if not is_loopback_host(host) and not token and not allow_insecure_remote:
            raise ValueError(
                f"refusing to bind {address!r} without a cluster token: a non-loopback "
                "listener runs pickled code sent to it, so it needs --token / "
                "--token-file / MESHRAY_TOKEN (or bind 127.0.0.1)")


def _bind_all(server, bind: list[str], tls: TlsConfig | None) -> list[str]:
    creds = tls.server_credentials() if tls is not None else None
    bound = []
    for address in bind:
        if address.startswith("unix:"):
            # Local only, inside a 0700 session dir: plaintext, token still checked.
            server.add_insecure_port(address)
            bound.append(address)
            continue
        host, port = split_host_port(address)
        target = join_host_port(host, port)
        try:
            actual = (server.add_secure_port(target, creds) if creds is not None
                      else server.add_insecure_port(target))
        except RuntimeError as exc:  # grpc raises this when the port is taken
            raise OSError(f"could not bind gRPC server to {address!r}: {exc}") from None
        if actual == 0:
            raise OSError(f"could not bind gRPC server to {address!r}")
        bound.append(f"{host}:{actual}")
    return bound


def make_aio_server(bind: list[str], *, token: str | None,
                    allow_insecure_remote: bool = False,
                    tls: TlsConfig | None = TLS_FROM_ENV) -> tuple[grpc.aio.Server, list[str]]:
    """Build an asyncio gRPC server bound to each address in `bind`.

    Addresses are "host:port" (port 0 picks a free one) or "unix:/path".
    Returns the server and the concrete addresses it listens on. A
    non-loopback TCP bind without a token is refused: a meshray port runs
    pickled code, so an open one would be remote code execution. With `tls`
    (default: from MESHRAY_TLS_*), TCP ports serve TLS; unix sockets do not.
    """
    token = _check_token(token)
    _check_binds(bind, token, allow_insecure_remote)
    tls = resolve_tls(tls)
    checker = ProofChecker(token) if token else None
    interceptors = [AioGate(checker)] if checker else []
    if _failpoints_wanted():     # chaos testing only; see "failpoints" above
        interceptors.append(_AioFailpoints(_Failpoints()))
    server = grpc.aio.server(interceptors=interceptors,
                             options=_SERVER_OPTIONS + limits.server_options())
    return server, limits.watch(_bound(server, checker, _bind_all(server, bind, tls)))


def make_server(bind: list[str], *, token: str | None, max_workers: int = 64,
                allow_insecure_remote: bool = False,
                tls: TlsConfig | None = TLS_FROM_ENV) -> tuple[grpc.Server, list[str]]:
    """Build a thread-pool gRPC server (for worker processes, e.g. actors).

    Same binding, token and TLS rules as make_aio_server.
    """
    from concurrent import futures

    token = _check_token(token)
    _check_binds(bind, token, allow_insecure_remote)
    tls = resolve_tls(tls)
    checker = ProofChecker(token) if token else None
    interceptors = [SyncGate(checker)] if checker else []
    if _failpoints_wanted():     # chaos testing only; see "failpoints" above
        interceptors.append(_SyncFailpoints(_Failpoints()))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers,
                                                    thread_name_prefix="meshray-rpc"),
                         interceptors=interceptors,
                         options=_SERVER_OPTIONS + limits.server_options())
    return server, limits.watch(_bound(server, checker, _bind_all(server, bind, tls)))


def _bound(server, checker: ProofChecker | None, bound: list[str]) -> list[str]:
    server._meshray_proofs = checker
    if checker is not None:
        checker.accept_targets(bound)
    return bound


def accept_targets(server, addresses) -> None:
    """Tell `server` the addresses it is dialled at besides those it bound.

    A proof names the address its caller dialled, and a server refuses
    proofs made for another address (an impostor there could otherwise relay
    them). A node that binds 0.0.0.0 or sits behind an address it advertises
    must list that advertised address here before publishing it.
    """
    checker = getattr(server, "_meshray_proofs", None)
    if checker is not None:
        checker.accept_targets(addresses)


# ------------------------------------------------------------------ channels
def _channel_security(target: str, tls) -> TlsConfig | None:
    """The TLS config a channel to `target` uses (None: plaintext)."""
    if not isinstance(target, str) or not target:
        raise ValueError(f"target={target!r} must be 'host:port' or 'unix:/path'")
    tls = resolve_tls(tls)
    # A unix socket never leaves the machine and its server serves it in
    # plaintext (see _bind_all); TLS there would only fail the handshake.
    return None if target.startswith("unix:") else tls


def make_channel(target: str, *, token: str | None,
                 tls: TlsConfig | None = TLS_FROM_ENV) -> grpc.Channel:
    """Build a blocking-API channel to `target` ("host:port" or "unix:/path").

    TCP targets use TLS when `tls` (default: from MESHRAY_TLS_*) is set.
    """
    token = _check_token(token)
    tls = _channel_security(target, tls)
    if tls is None:
        channel = grpc.insecure_channel(target, options=_COMMON_OPTIONS)
    else:
        channel = grpc.secure_channel(target, tls.channel_credentials(),
                                      options=_COMMON_OPTIONS + tls.channel_options())
    if token:
        channel = grpc.intercept_channel(channel, SyncProofs(token, target, channel))
    return channel


def make_aio_channel(target: str, *, token: str | None,
                     tls: TlsConfig | None = TLS_FROM_ENV) -> grpc.aio.Channel:
    """The asyncio twin of make_channel, for daemon-to-daemon calls.

    Must be called with an event loop running (or at least set) in this
    thread, like any grpc.aio channel.
    """
    token = _check_token(token)
    tls = _channel_security(target, tls)
    state, interceptors = aio_proofs(token, target) if token else (None, None)
    if tls is None:
        channel = grpc.aio.insecure_channel(target, options=_COMMON_OPTIONS,
                                            interceptors=interceptors)
    else:
        channel = grpc.aio.secure_channel(target, tls.channel_credentials(),
                                          options=_COMMON_OPTIONS + tls.channel_options(),
                                          interceptors=interceptors)
    if state is not None:
        state.channel = channel
    return channel
