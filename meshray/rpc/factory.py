"""The single seam through which every gRPC channel and server is built.

Keeping construction in one place means deadlines, keepalive, message limits
and the cluster-token check cannot be forgotten by one caller: a server built
here rejects a call without the right token before any handler (and so any
unpickling) runs, and a channel built here sends the token on every call.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import socket

import grpc
import grpc.aio

__all__ = [
    "TOKEN_METADATA_KEY",
    "MAX_MESSAGE_BYTES",
    "is_loopback_host",
    "make_aio_server",
    "make_channel",
    "make_server",
    "split_host_port",
]

log = logging.getLogger(__name__)

TOKEN_METADATA_KEY = "meshray-token"
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


class _TokenCheck(grpc.aio.ServerInterceptor):
    """Reject calls whose metadata lacks the cluster token.

    Runs on the call's metadata, before the request message is read, so a
    caller without the token never gets a payload deserialized.
    """

    def __init__(self, token: str):
        self._token = token.encode()

        async def deny(request_or_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong meshray cluster token")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_stream_rpc_method_handler(deny)

    async def intercept_service(self, continuation, handler_call_details):
        sent = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == TOKEN_METADATA_KEY:
                sent = value.encode() if isinstance(value, str) else value
                break
        if hmac.compare_digest(sent, self._token):
            return await continuation(handler_call_details)
        log.warning("rejected unauthenticated call to %s", handler_call_details.method)
        if handler_call_details.method.endswith("/Connect"):
            return self._deny_stream
        return self._deny_unary


def make_aio_server(bind: list[str], *, token: str | None,
                    allow_insecure_remote: bool = False) -> tuple[grpc.aio.Server, list[str]]:
    """Build an asyncio gRPC server bound to each address in `bind`.

    Addresses are "host:port" (port 0 picks a free one) or "unix:/path".
    Returns the server and the concrete addresses it listens on. A
    non-loopback TCP bind without a token is refused: a meshray port runs
    pickled code, so an open one would be remote code execution.
    """
    interceptors = [_TokenCheck(token)] if token else []
    server = grpc.aio.server(interceptors=interceptors, options=_SERVER_OPTIONS)
    return server, _bind_all(server, bind, token, allow_insecure_remote)


class _SyncTokenCheck(grpc.ServerInterceptor):
    """The blocking-server twin of _TokenCheck (same rule, same moment)."""

    def __init__(self, token: str):
        self._token = token.encode()

        def deny(request_or_iterator, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong meshray cluster token")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        sent = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == TOKEN_METADATA_KEY:
                sent = value.encode() if isinstance(value, str) else value
                break
        if hmac.compare_digest(sent, self._token):
            return continuation(handler_call_details)
        log.warning("rejected unauthenticated call to %s", handler_call_details.method)
        if handler_call_details.method.endswith("/Call"):
            return self._deny_stream
        return self._deny_unary


def _bind_all(server, bind: list[str], token: str | None, allow_insecure_remote: bool) -> list[str]:
    bound = []
    for address in bind:
        if address.startswith("unix:"):
            server.add_insecure_port(address)
            bound.append(address)
            continue
        host, port = split_host_port(address)
        if not is_loopback_host(host) and not token and not allow_insecure_remote:
            raise ValueError(
                f"refusing to bind {address!r} without a cluster token: a non-loopback "
                "listener needs --token / MESHRAY_TOKEN")
        actual = server.add_insecure_port(f"{host}:{port}" if ":" not in host else f"[{host}]:{port}")
        if actual == 0:
            raise OSError(f"could not bind gRPC server to {address!r}")
        bound.append(f"{host}:{actual}")
    return bound


def make_server(bind: list[str], *, token: str | None, max_workers: int = 64,
                allow_insecure_remote: bool = False) -> tuple[grpc.Server, list[str]]:
    """Build a thread-pool gRPC server (for worker processes, e.g. actors)."""
    from concurrent import futures

    interceptors = [_SyncTokenCheck(token)] if token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers,
                                                    thread_name_prefix="meshray-rpc"),
                         interceptors=interceptors, options=_SERVER_OPTIONS)
    return server, _bind_all(server, bind, token, allow_insecure_remote)


class _TokenMetadata(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor,
                     grpc.UnaryStreamClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Attach the cluster token to every outgoing call."""

    def __init__(self, token: str):
        self._pair = (TOKEN_METADATA_KEY, token)

    def _details(self, details):
        metadata = list(details.metadata or ())
        metadata.append(self._pair)
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(
            details.method, details.timeout, metadata, details.credentials,
            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def make_channel(target: str, *, token: str | None) -> grpc.Channel:
    """Build a blocking-API channel to `target` ("host:port" or "unix:/path")."""
    channel = grpc.insecure_channel(target, options=_COMMON_OPTIONS)
    if token:
        channel = grpc.intercept_channel(channel, _TokenMetadata(token))
    return channel
