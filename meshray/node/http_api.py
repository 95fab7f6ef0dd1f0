"""The node's HTTP server: Ray's REST API (jobs) and the dashboard.

One per node daemon, on the node's host (loopback unless told otherwise) and
the port of ``--dashboard-port`` (Ray's 8265 by default, a free port when that
is taken). It runs on its own threads, never on the daemon's event loop: a
slow client cannot stall dispatch; handlers that need the loop's tables ask
it with a deadline (``HttpApi.on_loop``).

Every request must prove it holds the cluster token, one of two ways:

- ``Authorization: Bearer <token>``, compared in constant time;
- a session cookie from ``POST /login`` (body ``{"token": ...}``), HttpOnly and
  SameSite=Strict, for the browser UI. A state-changing request (any method
  but GET/HEAD) made with the cookie must also carry the session's CSRF token
  in ``X-CSRF-Token`` (the login answer gives it): a page on another site can
  make the browser send the cookie, never read the CSRF token.

A request with neither is answered 401 before any handler runs. A node
without a cluster token serves nothing but the page's files and 401: there
is nothing to check a caller against. With TLS configured for the node
(MESHRAY_TLS_*), the server speaks HTTPS with the node's certificate (and demands client certificates
when ``client_auth`` is on). The token is never logged.

Routes are a table of (method, path pattern, handler); a handler takes a
``Request`` and returns ``(status, JSON-able)``, or ``(status, Asset)`` for a
file of the dashboard's page. Only ``public`` routes (the page's own files,
which hold no cluster data) are answered before the token check.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, urlsplit

__all__ = ["Asset", "DEFAULT_DASHBOARD_PORT", "HttpApi", "HttpError", "Request", "Route",
           "check_bearer", "SESSION_COOKIE", "CSRF_HEADER"]

log = logging.getLogger(__name__)

DEFAULT_DASHBOARD_PORT = 8265
SESSION_COOKIE = "meshray_session"
CSRF_HEADER = "X-CSRF-Token"
SESSION_TTL_S = 12 * 3600.0
MAX_BODY_BYTES = 1 << 20
MAX_SESSIONS = 10_000
REQUEST_TIMEOUT_S = 30.0
LOOP_TIMEOUT_S = 30.0
_SAFE_METHODS = frozenset({"GET", "HEAD"})
# The page may load only its own files and talk only to the node that served
# it: no inline script, no other origin, no framing (clickjacking).
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class HttpError(Exception):
    """Answered as ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    method: str
    path: str
    query: dict
    headers: dict
    body: bytes
    params: dict = field(default_factory=dict)   # named groups of the route's pattern

    def json(self):
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise HttpError(400, f"request body is not valid JSON: {exc}") from None

    def arg(self, name: str, default=None):
        values = self.query.get(name)
        return values[-1] if values else default


@dataclass(frozen=True)
class Asset:
    """A response body sent as is (a file of the dashboard's page), not as JSON."""
    content_type: str
    data: bytes


@dataclass(frozen=True)
class Route:
    method: str
    pattern: str                       # a regex matched against the whole path
    handler: Callable[[Request], tuple]
    public: bool = False               # answered without the token (static page files)
    max_body: int = MAX_BODY_BYTES     # above MAX_BODY_BYTES only for an authorized caller

    def match(self, method: str, path: str):
        if method != self.method:
            return None
        return re.fullmatch(self.pattern, path)


def check_bearer(header: str | None, token: str | None) -> bool:
    """Whether an Authorization header carries `token` (constant-time compare)."""
    if not token or not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].strip().encode(), token.encode())


class _Sessions:
    """Browser sessions: cookie id -> (CSRF token, expiry). Ids are kept hashed."""

    def __init__(self):
        self._lock = threading.Lock()
        self._sessions: dict[str, tuple[str, float]] = {}

    @staticmethod
    def _key(session_id: str) -> str:
        return hashlib.sha256(session_id.encode()).hexdigest()

    def create(self) -> tuple[str, str]:
        session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            if len(self._sessions) >= MAX_SESSIONS:
                self._sessions = {k: v for k, v in self._sessions.items() if v[1] > now}
                if len(self._sessions) >= MAX_SESSIONS:
                    raise HttpError(503, "too many open sessions; try again later")
            self._sessions[self._key(session_id)] = (csrf, now + SESSION_TTL_S)
        return session_id, csrf

    def csrf_of(self, session_id: str) -> str | None:
        with self._lock:
            entry = self._sessions.get(self._key(session_id))
            if entry is None or entry[1] < time.monotonic():
                return None
            return entry[0]

    def drop(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(self._key(session_id), None)


def _cookie(headers, name: str) -> str | None:
    for part in (headers.get("Cookie") or "").split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value
    return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    tls_context = None

    def finish_request(self, request, client_address):
        # The TLS handshake runs on the request's own thread, with a deadline,
        # so a client that never finishes it holds up nobody else.
        request.settimeout(REQUEST_TIMEOUT_S)
        if self.tls_context is not None:
            try:
                request = self.tls_context.wrap_socket(request, server_side=True)
            except (OSError, ValueError):
                return
        super().finish_request(request, client_address)


class HttpApi:
    """The server and its route table; `add_routes` before `start`."""

    def __init__(self, daemon, port: int | None = None):
        self.daemon = daemon
        self.requested_port = port
        self.port = 0
        self.scheme = "http"
        self.routes: list[Route] = []
        self.sessions = _Sessions()
        self._server = None
        self._thread = None
        self._loop = None

    def add_routes(self, routes) -> None:
        self.routes.extend(routes)

    @property
    def token(self) -> str | None:
        return self.daemon.config.token

    # ------------------------------------------------------------ lifecycle
    def start(self, loop) -> None:
        """Bind the port on the daemon's host and serve on a thread."""
        self._loop = loop
        host = self.daemon.config.host
        api = self

        class Handler(_Handler):
            owner = api

        class Server(_Server):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        ports = ([self.requested_port] if self.requested_port is not None
                 else [DEFAULT_DASHBOARD_PORT, 0])
        for index, port in enumerate(ports):
            try:
                self._server = Server((host, port), Handler)
                break
            except OSError as exc:
                if index == len(ports) - 1:
                    raise OSError(exc.errno, f"cannot serve the HTTP API on {host}:{port} "
                                  f"(--dashboard-port): {exc.strerror}") from exc
        self._server.tls_context = self._tls_context()
        if self._server.tls_context is not None:
            self.scheme = "https"
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="meshray-http-api", daemon=True)
        self._thread.start()

    @staticmethod
    def _tls_context():
        from meshray.rpc.tls import TlsConfig
        tls = TlsConfig.from_env()
        if tls is None or tls.cert is None:
            return None
        import ssl
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(tls.cert, tls.key)
        if tls.client_auth and tls.ca:
            context.load_verify_locations(cafile=tls.ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def on_loop(self, coroutine, timeout: float = LOOP_TIMEOUT_S):
        """Run `coroutine` on the daemon's loop and wait for its result."""
        loop = self._loop
        if loop is None or loop.is_closed():
            coroutine.close()
            raise HttpError(503, "the node is shutting down")
        future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise HttpError(504, f"the node did not answer within {timeout:.0f}s") from None

    # ------------------------------------------------------------ requests
    def authorize(self, method: str, headers) -> str | None:
        """None when the request may proceed, else why not (answered 401/403)."""
        if not self.token:
            return "this node runs without a cluster token, so its HTTP API is off"
        if check_bearer(headers.get("Authorization"), self.token):
            return None
        session_id = _cookie(headers, SESSION_COOKIE)
        csrf = self.sessions.csrf_of(session_id) if session_id else None
        if csrf is None:
            return ("authentication required: send 'Authorization: Bearer <cluster token>' "
                    "or log in with POST /login")
        if method not in _SAFE_METHODS:
            given = headers.get(CSRF_HEADER) or ""
            if not hmac.compare_digest(given.encode(), csrf.encode()):
                return f"CSRF check failed: a {method} with the session cookie needs {CSRF_HEADER}"
        return None

    def login(self, request: Request) -> tuple:
        """POST /login: the token (body or Bearer) buys a session cookie and a CSRF token."""
        token = None
        if check_bearer(request.headers.get("Authorization"), self.token):
            token = self.token
        else:
            body = request.json()
            token = body.get("token") if isinstance(body, dict) else None
        if not self.token or not isinstance(token, str) or not hmac.compare_digest(
                token.encode(), self.token.encode()):
            raise HttpError(401, "login refused: wrong or missing cluster token")
        session_id, csrf = self.sessions.create()
        secure = "; Secure" if self.scheme == "https" else ""
        cookie = (f"{SESSION_COOKIE}={session_id}; HttpOnly; SameSite=Strict; Path=/; "
                  f"Max-Age={int(SESSION_TTL_S)}{secure}")
        return 200, {"csrf_token": csrf}, [("Set-Cookie", cookie)]

    def body_limit(self, method: str, path: str, headers) -> tuple[int, str | None]:
        """(most bytes of body to read, why not when refused on the headers alone).

        A route may take a bigger body (a package upload), but only from a
        caller that proved it holds the token: nobody else makes the node read
        more than MAX_BODY_BYTES.
        """
        for route in self.routes:
            if route.max_body > MAX_BODY_BYTES and route.match(method, path):
                refused = self.authorize(method, headers)
                return (MAX_BODY_BYTES, refused) if refused else (route.max_body, None)
        return MAX_BODY_BYTES, None

    def dispatch(self, request: Request) -> tuple:
        """(status, body, extra headers) for one request."""
        if request.method == "POST" and request.path == "/login":
            return self.login(request)
        for route in self.routes:
            if route.public and route.match(request.method, request.path):
                return self._answer(route, request)
        refused = self.authorize(request.method, request.headers)
        if refused is not None:
            return (403 if refused.startswith("CSRF") else 401), {"error": refused}, []
        if request.method == "POST" and request.path == "/logout":
            session_id = _cookie(request.headers, SESSION_COOKIE)
            if session_id:
                self.sessions.drop(session_id)
            return 200, {"ok": True}, [("Set-Cookie", f"{SESSION_COOKIE}=; Max-Age=0; Path=/")]
        allowed = []
        for route in self.routes:
            found = route.match(request.method, request.path)
            if found is None:
                if re.fullmatch(route.pattern, request.path):
                    allowed.append(route.method)
                continue
            return self._answer(route, request)
        if allowed:
            return 405, {"error": f"{request.method} {request.path}: method not allowed "
                                  f"(allowed: {', '.join(sorted(set(allowed)))})"}, []
        return 404, {"error": f"no such endpoint: {request.path}"}, []

    @staticmethod
    def _answer(route: Route, request: Request) -> tuple:
        request.params = route.match(request.method, request.path).groupdict()
        answer = route.handler(request)
        return answer[0], answer[1], list(answer[2]) if len(answer) > 2 else []


class _Handler(BaseHTTPRequestHandler):
    owner: HttpApi = None
    protocol_version = "HTTP/1.1"
    server_version = "meshray"

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass           # request lines may carry ids; failures are logged below instead

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        length = self.headers.get("Content-Length")
        try:
            size = int(length) if length else 0
        except ValueError:
            size = -1
        limit, refused = self.owner.body_limit(self.command, parts.path, self.headers)
        if refused is not None and size > limit:
            self.close_connection = True     # the body is left unread
            self._send(403 if refused.startswith("CSRF") else 401, {"error": refused}, [])
            return
        if size < 0 or size > limit:
            self.close_connection = True
            self._send(413 if size > 0 else 400,
                       {"error": f"Content-Length={length!r}: expected 0..{limit}"}, [])
            return
        body = self.rfile.read(size) if size else b""
        request = Request(method=self.command, path=parts.path, query=parse_qs(parts.query),
                          headers=self.headers, body=body)
        try:
            status, payload, extra = self.owner.dispatch(request)
        except HttpError as exc:
            status, payload, extra = exc.status, {"error": str(exc)}, []
        except (ValueError, TypeError) as exc:
            status, payload, extra = 400, {"error": str(exc)}, []
        except Exception as exc:  # noqa: BLE001 - answered 500, logged with the cause
            log.exception("HTTP %s %s failed", self.command, parts.path)
            status, payload, extra = 500, {"error": f"{type(exc).__name__}: {exc}"}, []
        self._send(status, payload, extra)

    def _send(self, status: int, payload, extra) -> None:
        if isinstance(payload, Asset):
            data, content_type = payload.data, payload.content_type
            extra = [*extra, ("Content-Security-Policy", PAGE_POLICY),
                     ("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer")]
        else:
            data, content_type = json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = do_HEAD = _handle
